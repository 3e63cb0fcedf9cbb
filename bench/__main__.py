"""Run every benchmark in bench/ (`python -m bench`): each `bench_<topic>.py` module's `main()`, in name order.

`python -m bench normalize safety` (or `bench_normalize ...`) runs only the benchmarks named.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

found = {path.stem: path for path in sorted(Path(__file__).parent.glob("bench_*.py"))}
wanted = [name if name.startswith("bench_") else f"bench_{name}" for name in sys.argv[1:]] or list(found)
unknown = [name for name in wanted if name not in found]
if unknown:
    sys.exit(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(found)}")
for name in wanted:
    print(f"== {name}")
    importlib.import_module(f"bench.{name}").main()
