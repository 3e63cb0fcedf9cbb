"""Peak memory of the normalize and mine stages on the real rows in ../shared/mirror (MIC from the
bundled sample; the bundled sample alone when the mirror is absent) and on a synthetic corpus ten times
larger, to show that memory grows no faster than the data.

Every measurement runs in a fresh subprocess (`python -m bench.bench_memory --worker ...`) that
reports its peak resident memory twice: `base`, after the imports and before the stage runs, and
`peak`, after it. Linux's VmHWM is used (it starts afresh at exec); `resource.getrusage`'s ru_maxrss
is the fallback, which on Linux also counts the forking parent's memory. The growth that matters is
that of `peak - base`, the stage's own memory.

- normalize: `normalize.run` on one corpus's raw splits (written by `download`, not measured). The
  synthetic corpus repeats every raw row ten times with the ids that group rows into dialogues made
  distinct per copy (ProsocialDialog `dialogue_id`, PersonaChat and EmpatheticDialogues `conv_id`,
  MIC's question), so it has ten times the dialogues, not ten times longer ones.
- mine: stage 1 then stage 2, measured by `bench_mine`'s own worker on the normalized corpora and on
  `bench_mine.replicate`'s ten-fold copy (see bench/bench_mine.py; its table also gives the timings).

    python -m bench bench_memory                  (or python -m bench.bench_memory [--scale 10] [--only normalize])
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_mine import MIRROR, REPO_ROOT, normalize_real, peak_memory_mb, replicate
from bench.bench_mine import measure as measure_mine

# The id columns that group raw rows into dialogues; a copy's ids must differ from the original's.
DIALOGUE_KEYS = {"prosocial_dialog": "dialogue_id", "mic": "Q", "persona_chat": "conv_id",
                 "empathetic_dialogues": "conv_id"}


def replicate_raw(raw: Path, out: Path, scale: int) -> Path:
    """Write every raw split of every corpus `scale` times over, with distinct dialogue ids per copy."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for corpus_dir in sorted(p for p in raw.iterdir() if p.is_dir()):
        key = DIALOGUE_KEYS.get(corpus_dir.name)
        (out / corpus_dir.name).mkdir(parents=True)
        for path in sorted(corpus_dir.glob("*.parquet")):
            table = pq.read_table(path)
            copies = []
            for copy in range(scale):
                if key is not None and copy:
                    column = table.column(key)
                    if pa.types.is_integer(column.type):
                        offset = (pc.max(column).as_py() or 0) + 1
                        column = pc.add(column, pa.scalar(copy * offset, column.type))
                    else:
                        column = pc.binary_join_element_wise(column, f" ~{copy}", "")
                    table_copy = table.set_column(table.schema.get_field_index(key), key, column)
                else:
                    table_copy = table
                copies.append(table_copy)
            pq.write_table(pa.concat_tables(copies), out / corpus_dir.name / path.name)
    return out


def normalize_worker(corpus: str, raw: Path, out: Path) -> dict:
    """Normalize one corpus; its rows, seconds and memory."""
    from pipeline.config import NormalizeConfig, load_section
    from pipeline.stages import normalize  # imported before `base`, like pyarrow with it

    config = load_section(REPO_ROOT / "params.yaml", "normalize", NormalizeConfig)
    base_mb = peak_memory_mb()
    start = time.perf_counter()
    stats = normalize.run(config, corpus, raw, out)
    return {"raw_rows": sum(f["rows"] for f in stats["raw_files"].values()), "rows": sum(stats["rows"].values()),
            "seconds": time.perf_counter() - start, "base_mb": base_mb, "peak_mb": peak_memory_mb()}


def measure_normalize(corpus: str, raw: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "bench.bench_memory", "--worker", corpus, str(raw), str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bench_memory worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def growth(small: dict, large: dict, size: str) -> str:
    own = [max(r["peak_mb"] - r["base_mb"], 1.0) for r in (small, large)]
    return f"x{large[size] / max(small[size], 1):.1f} data, x{own[1] / own[0]:.1f} memory"


def main(scale: int = 10, only: str | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_memory.") as temp:
        base = Path(temp)
        start = time.perf_counter()
        normalized = normalize_real(base)
        print(f"prepared the corpora in {time.perf_counter() - start:.0f} s (not measured)")
        if only in (None, "normalize"):
            corpora = sorted(p.name for p in (MIRROR if MIRROR.is_dir() else base / "raw").iterdir() if p.is_dir())
            synthetic_raw = replicate_raw(base / "raw", base / f"raw-x{scale}", scale)
            print(f"normalize{'':<17}{'raw rows':>10}{'rows':>10}{'seconds':>9}{'base MB':>9}{'peak MB':>9}"
                  f"{'stage MB':>10}   growth")
            for corpus in corpora:
                small = measure_normalize(corpus, base / "raw" / corpus, base / "n1" / corpus)
                large = measure_normalize(corpus, synthetic_raw / corpus, base / f"n{scale}" / corpus)
                for name, r in ((f"{corpus}", small), (f"  x{scale}", large)):
                    print(f"  {name:<24}{r['raw_rows']:>10}{r['rows']:>10}{r['seconds']:>9.1f}{r['base_mb']:>9.0f}"
                          f"{r['peak_mb']:>9.0f}{r['peak_mb'] - r['base_mb']:>10.0f}"
                          + (f"   {growth(small, large, 'rows')}" if r is large else ""))
        if only in (None, "mine"):
            synthetic = replicate(normalized, base / f"x{scale}", scale)
            print(f"mine, stage 1 + 2{'':<9}{'contexts':>10}{'groups':>10}{'seconds':>9}{'base MB':>9}{'peak MB':>9}"
                  f"{'stage MB':>10}   growth")
            small = measure_mine(normalized, base / "m1")
            large = measure_mine(synthetic, base / f"m{scale}")
            for r in (small, large):
                r["contexts_total"] = sum(r["contexts"])
            for name, r in (("all corpora", small), (f"  x{scale}", large)):
                print(f"  {name:<24}{sum(r['contexts']):>10}{sum(r['groups']):>10}{sum(r['seconds']):>9.1f}"
                      f"{r['base_mb']:>9.0f}{r['peak_mb']:>9.0f}{r['peak_mb'] - r['base_mb']:>10.0f}"
                      + (f"   {growth(small, large, 'contexts_total')}" if r is large else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("CORPUS", "RAW", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, default=10, help="size of the synthetic corpus, in copies of the real one")
    parser.add_argument("--only", choices=["normalize", "mine"], help="measure one stage only")
    args = parser.parse_args()
    if args.worker:
        corpus, raw, out = args.worker
        print(json.dumps(normalize_worker(corpus, Path(raw), Path(out))))
    else:
        main(args.scale, args.only)
