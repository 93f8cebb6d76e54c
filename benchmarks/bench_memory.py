"""Memory profiling: DIET vs s-DIET vs SimCLR vs supervised across N (s-DIET paper Fig. 3 / Table 15).

    python benchmarks/bench_memory.py [--preset cpu-resnet18|gpu-resnet50|tiny] [...]
    diet bench memory [...]                      # the same through the CLI

See benchmarks/memory/harness.py for the method; results go to benchmarks/results/memory_<preset>.*
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.memory.harness import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
