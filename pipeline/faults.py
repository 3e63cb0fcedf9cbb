"""A test hook that kills a stage in the middle of its work, to prove a rerun recovers.

Set `PIPELINE_TEST_KILL_AT=<stage>:<point>[:<n>]` and run `dvc repro`: when the DVC stage `<stage>`
(DVC gives each command its name in `DVC_STAGE`, e.g. `train_stage1`, `normalize@mic`; `*` matches
any) reaches `<point>` for the `<n>`-th time (default 1), its whole process group, `dvc repro`
included, gets SIGKILL, as a power cut would: nothing is cleaned up. The points:

- `write`: a file was renamed into place by `artifacts.atomic_path` (every Parquet, JSON, CSV, PNG and
  npz output; inside a staged folder, that folder is still unfinished);
- `swap`: `artifacts.staged_dir` has moved the previous output folder aside and not yet moved the
  new one in (the output folder does not exist at that moment);
- `checkpoint`: a training checkpoint is complete (`pipeline/stages/train.py`).

    PIPELINE_TEST_KILL_AT=train_stage1:checkpoint dvc repro   # killed after the first checkpoint
    dvc repro                                                  # resumes; same weights as without the kill

`tests/test_reliability.py` runs this for every stage. Unset (the normal case), `kill_point` costs
one environment lookup.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

from pipeline.errors import ConfigError

ENV = "PIPELINE_TEST_KILL_AT"
POINTS = ("write", "swap", "checkpoint")

_hits: Counter = Counter()


def kill_point(point: str) -> None:
    """SIGKILL the process group here if `PIPELINE_TEST_KILL_AT` names this stage, `point` and hit count."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    stage, wanted, count = parse(spec)
    if point != wanted or stage not in ("*", os.environ.get("DVC_STAGE", "")):
        return
    _hits[point] += 1
    if _hits[point] == count:
        print(f"{ENV}: killing {stage} at {point} #{count}", file=sys.stderr, flush=True)
        os.killpg(os.getpgrp(), signal.SIGKILL)


def parse(spec: str) -> tuple[str, str, int]:
    """`<stage>:<point>[:<n>]` -> (stage, point, n); a malformed spec is a ConfigError naming the variable."""
    parts = spec.split(":")
    if len(parts) == 2:
        parts.append("1")
    if len(parts) != 3 or parts[1] not in POINTS or not parts[2].isdigit() or int(parts[2]) < 1 or not parts[0]:
        raise ConfigError(f"{ENV} = {spec!r} is not allowed: <stage>:<point>[:<n>] with a point from "
                          f"{', '.join(POINTS)} and n >= 1")
    return parts[0], parts[1], int(parts[2])
