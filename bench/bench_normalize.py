"""Benchmark of the normalize stage on the real rows in ../shared/mirror (MIC from the bundled sample; the
bundled sample alone when the mirror is absent): rows per second per corpus and in total.

Each corpus is first downloaded into a temporary folder (not timed), then `normalize.run` is timed. The
baseline, measured in the same run on the same files, is the bare Parquet I/O of the stage (read the
raw splits, write the normalized ones); `x I/O` says how many times that the whole stage takes.

    python -m bench bench_normalize        (or python -m bench.bench_normalize)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import CORPORA, SPLITS, CorporaConfig, NormalizeConfig, load_section
from pipeline.stages import download, normalize

REPO_ROOT = Path(__file__).resolve().parents[1]
MIRROR = REPO_ROOT.parent / "shared" / "mirror"


def io_baseline(raw: Path, normalized: Path, scratch: Path) -> float:
    """Seconds to read the raw split files and write the normalized ones again: the stage's bare I/O."""
    scratch.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for path in raw.glob("*.parquet"):
        pq.read_table(path)
    for split in SPLITS:
        pq.write_table(pq.read_table(normalized / f"{split}.parquet"), scratch / f"{split}.parquet",
                       compression="zstd")
    return time.perf_counter() - start


def main() -> None:
    config = load_section(REPO_ROOT / "params.yaml", "normalize", NormalizeConfig)
    sample = str(REPO_ROOT / "data" / "sample")
    if MIRROR.is_dir():
        corpora = CorporaConfig(source="mirror", mirror=str(MIRROR), sample=sample, overrides={"mic": "sample"})
        print(f"normalize: {MIRROR} (mic from {sample})")
    else:
        corpora = CorporaConfig(source="sample", sample=sample)
        print(f"normalize: {MIRROR} is absent, so the bundled sample {sample}")
    print(f"{'corpus':<22}{'raw rows':>10}{'out rows':>10}{'seconds':>9}{'rows/s':>10}{'raw rows/s':>12}{'x I/O':>7}")
    totals = {"raw": 0, "out": 0, "seconds": 0.0, "io": 0.0}
    with tempfile.TemporaryDirectory(prefix="bench_normalize.") as temp:
        base = Path(temp)
        for corpus in CORPORA:
            raw, out = base / "raw" / corpus, base / "normalized" / corpus
            download.run(corpora, corpus, raw)
            raw_rows = sum(pq.read_metadata(path).num_rows for path in raw.glob("*.parquet"))
            start = time.perf_counter()
            stats = normalize.run(config, corpus, raw, out)
            seconds = time.perf_counter() - start
            io_seconds = io_baseline(raw, out, base / "io" / corpus)
            out_rows = sum(stats["rows"].values())
            print(f"{corpus:<22}{raw_rows:>10}{out_rows:>10}{seconds:>9.2f}{out_rows / seconds:>10.0f}"
                  f"{raw_rows / seconds:>12.0f}{seconds / io_seconds:>7.1f}")
            for key, value in (("raw", raw_rows), ("out", out_rows), ("seconds", seconds), ("io", io_seconds)):
                totals[key] += value
    print(f"{'total':<22}{totals['raw']:>10}{totals['out']:>10}{totals['seconds']:>9.2f}"
          f"{totals['out'] / totals['seconds']:>10.0f}{totals['raw'] / totals['seconds']:>12.0f}"
          f"{totals['seconds'] / totals['io']:>7.1f}")


if __name__ == "__main__":
    main()
