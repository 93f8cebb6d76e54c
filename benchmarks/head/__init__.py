"""Head-store benchmarks: gather + scatter vs zarr-python, opening cost, ImageNet-scale throughput."""
