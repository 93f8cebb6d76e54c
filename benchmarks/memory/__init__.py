"""Memory profiling of DIET, s-DIET, SimCLR and supervised training across data-set sizes N.

`diet bench memory` (harness.py) runs every (method, N) of a preset (presets.py, methods.py) in a
fresh subprocess (worker.py) under a memory cap, and writes tables and plots (report.py) to
benchmarks/results/. See harness.py for what is measured and how.
"""
