"""Kernel benchmarks: fused batch cross-entropy, exact lazy AdamW."""
