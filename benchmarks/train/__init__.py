"""In-training benchmarks: real `diet train` runs (disk vs memory head, s-DIET vs supervised, ranks, scale)."""
