"""Makes the head-store test helpers (`head_conformance`, `head_faults`) importable under
pytest's importlib import mode, which does not put test folders on sys.path."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
