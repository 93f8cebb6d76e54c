"""The engine's benchmarks: programs that measure against an in-run baseline and leave stamped tables.

    common.py   the one helper module: machine stamp, Markdown/CSV/JSON writers, page-cache eviction,
                raw disk bandwidth, peak-RSS sampler
    head/       the out-of-core head store         kernels/   batch CE, lazy AdamW
    loader/     shards and the loader               train/     real `diet train` runs
    memory/     peak memory across N                paper/     the s-DIET paper's checks
    gpu.py      all GPU checks in one command

Run one as `diet bench NAME` (launch/bench.py lists them) or `python -m benchmarks.<group>.<name>`
from the repository root. Results go to benchmarks/results/ (see README.md there).
"""
