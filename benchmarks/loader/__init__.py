"""Data-loading benchmarks: shard preparation and loader throughput, ShardLoader vs ImageFolder."""
