"""Benchmark of the mine stage: contexts per second and peak memory, on all real rows in
../shared/mirror (MIC from the bundled sample; the bundled sample alone when the mirror is absent) and
on a synthetic corpus ten times larger, so the growth is visible (it should be close to linear).

The corpora are downloaded and normalized into a temporary folder with the pipeline's own functions
(not timed); the synthetic corpus repeats every normalized row ten times with a copy number appended
to its dialogue id and to every text, so no two copies share a text. Each size is mined, stage 1
then stage 2 (with `params.yaml`'s `mine` section), in a fresh subprocess, which reports the mining
time and its peak resident memory (VmHWM; `base` is the peak before mining, after the imports). The
safety classifier is a fake that flags a few words (the classifier's own cost is in bench_safety).
The baseline, measured in the same subprocess, is the stage's bare Parquet I/O: read every input
file, write the groups again; `x I/O` says how many times that mining takes.

Then the stage-1 sampler of the `generated` source (`mine.Stage1Sampler`) on a random GPT-2 of the
sample's base-model size: contexts per second at `mine.generated_batch_size` 8 and 32 against 1 (the
baseline, one context per `generate` call), on the model device at `mine.precision` auto, in the
same run.

    python -m bench bench_mine        (or python -m bench.bench_mine [--scale 10])
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MIRROR = REPO_ROOT.parent / "shared" / "mirror"


# --- data -----------------------------------------------------------------------------------------


def normalize_real(base: Path) -> Path:
    """Download and normalize the six corpora into `base/normalized`; returns that folder."""
    from pipeline.config import CORPORA, CorporaConfig, NormalizeConfig, load_section
    from pipeline.stages import download, normalize

    config = load_section(REPO_ROOT / "params.yaml", "normalize", NormalizeConfig)
    sample = str(REPO_ROOT / "data" / "sample")
    if MIRROR.is_dir():
        corpora = CorporaConfig(source="mirror", mirror=str(MIRROR), sample=sample, overrides={"mic": "sample"})
        print(f"mine: real rows from {MIRROR} (mic from {sample})")
    else:
        corpora = CorporaConfig(source="sample", sample=sample)
        print(f"mine: {MIRROR} is absent, so the bundled sample {sample}")
    for corpus in CORPORA:
        download.run(corpora, corpus, base / "raw" / corpus)
        normalize.run(config, corpus, base / "raw" / corpus, base / "normalized" / corpus)
    return base / "normalized"


def with_suffix(strings, suffix: str):
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(strings, suffix, "")


def replicate(normalized: Path, out: Path, scale: int) -> Path:
    """Write every normalized split `scale` times over, each copy's ids and texts suffixed ` ~<copy>`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import CORPORA, SPLITS
    from pipeline.schemas import NORMALIZED

    def texts_list(column, suffix):
        column = column.combine_chunks()
        return pa.ListArray.from_arrays(column.offsets, with_suffix(column.flatten(), suffix))

    def unacceptable(column, suffix):
        column = column.combine_chunks()
        flat = column.flatten()
        struct = pa.StructArray.from_arrays([with_suffix(flat.field("text"), suffix), flat.field("severity")],
                                            fields=list(flat.type))
        return pa.ListArray.from_arrays(column.offsets, struct)

    for corpus in CORPORA:
        (out / corpus).mkdir(parents=True)
        for split in SPLITS:
            table = pq.read_table(normalized / corpus / f"{split}.parquet")
            copies = []
            for copy in range(scale):
                suffix = f" ~{copy}"
                replaced = {
                    "dialogue_id": with_suffix(table.column("dialogue_id"), suffix),
                    "context": texts_list(table.column("context"), suffix),
                    "response": with_suffix(table.column("response"), suffix),
                    "unacceptable_responses": unacceptable(table.column("unacceptable_responses"), suffix),
                }
                columns = [replaced.get(name, table.column(name)) for name in NORMALIZED.names]
                copies.append(pa.Table.from_arrays(columns, schema=NORMALIZED))
            pq.write_table(pa.concat_tables(copies), out / corpus / f"{split}.parquet")
    return out


# --- one size, in a subprocess --------------------------------------------------------------------


class KeywordScorer:
    """A fake safety classifier: P(casual) 0.3 for text with a flagged word, else 0.9 (vectorised)."""

    def predict_proba(self, responses, contexts=None):
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        flagged = np.asarray(pc.match_substring_regex(pc.utf8_lower(pa.array(responses, pa.string())),
                                                      r"\b(hate|stupid|kill|steal|lie|cheat)\b"), dtype=bool)
        casual = np.where(flagged, 0.3, 0.9)
        return np.stack([casual, (1 - casual) / 2, (1 - casual) / 2], axis=1)


def peak_memory_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec, whereas ru_maxrss
    keeps the forking parent's peak (the normalized corpora), so it is the fallback only."""
    import resource

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(normalized: Path, out: Path) -> dict:
    """Mine stage 1 and stage 2 from `normalized`; return timings, counts and memory as a dict."""
    import pyarrow.parquet as pq
    import scipy.sparse  # noqa: F401  imported before timing, as the stage's own imports are
    import sklearn.feature_extraction.text  # noqa: F401

    from pipeline.config import MineConfig, load_section
    from pipeline.stages import mine

    config = load_section(REPO_ROOT / "params.yaml", "mine", MineConfig)
    base_mb = peak_memory_mb()
    start = time.perf_counter()
    stats1 = mine.run(config, 1, normalized, KeywordScorer(), out / "stage1", progress=False)
    middle = time.perf_counter()
    stats2 = mine.run(config, 2, normalized, KeywordScorer(), out / "stage2", stage1_groups=out / "stage1",
                      progress=False)
    seconds = time.perf_counter() - start
    peak_mb = peak_memory_mb()

    io_start = time.perf_counter()
    for path in normalized.glob("*/*.parquet"):
        pq.read_table(path)
    for path in out.glob("stage*/*.parquet"):
        pq.write_table(pq.read_table(path), out / f"io-{path.parent.name}-{path.name}", compression="zstd")
    io_seconds = time.perf_counter() - io_start

    def contexts(stats):
        return sum(split["contexts"] for split in stats["splits"].values())

    def groups(stats):
        return sum(split["rows_written"] for split in stats["splits"].values())

    return {"contexts": [contexts(stats1), contexts(stats2)], "groups": [groups(stats1), groups(stats2)],
            "seconds": [middle - start, seconds - (middle - start)], "io_seconds": io_seconds,
            "base_mb": base_mb, "peak_mb": peak_mb}


def measure(normalized: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "bench.bench_mine", "--worker", str(normalized), str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bench_mine worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the stage-1 sampler --------------------------------------------------------------------------


def tiny_base_model(folder: Path) -> Path:
    """A random GPT-2 of `base_model`'s default size (2 layers, 128 wide) with a BPE tokenizer trained
    on a few sentences, saved as a model folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.modeling import train_tokenizer

    texts = ["hello there, how are you?", "i went hiking with my dog.", "it's wrong to steal.",
             "what did you do today?", "you should be kind to your friends."] * 20
    tokenizer = train_tokenizer(texts, vocab_size=2000)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=128, n_layer=2, n_head=4, n_inner=512,
                                       n_positions=512, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sampler_bench(contexts: int = 64, k: int = 4) -> dict:
    """Seconds for the stage-1 sampler to give `k` samples for each of `contexts` contexts, per batch size."""
    from pipeline.config import MineConfig
    from pipeline.stages import mine

    texts = [[f"what did you do on day {i}?", "i went hiking with my dog.", f"was it fun, number {i}?"]
             for i in range(contexts)]
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="bench_mine_sampler.") as temp:
        folder = tiny_base_model(Path(temp))
        for batch_size in (1, 8, 32):
            sampler = mine.load_stage1_generator(folder, MineConfig(generated_batch_size=batch_size, generated_k=k))
            sampler(texts[:2], k)  # warm-up: first-call allocations
            start = time.perf_counter()
            sampler(texts, k)
            seconds[batch_size] = time.perf_counter() - start
    print(f"stage-1 sampler on {sampler.device} ({sampler.precision}), {contexts} contexts x {k} samples, "
          f"{sampler.decoding.max_new_tokens} new tokens at most:")
    print(f"{'batch size':>12}{'seconds':>10}{'contexts/s':>12}{'x batch 1':>11}")
    for batch_size, value in seconds.items():
        print(f"{batch_size:>12}{value:>10.2f}{contexts / value:>12.1f}{seconds[1] / value:>11.1f}")
    return seconds


# --- main -----------------------------------------------------------------------------------------


def main(scale: int = 10) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_mine.") as temp:
        base = Path(temp)
        start = time.perf_counter()
        real = normalize_real(base)
        synthetic = replicate(real, base / f"x{scale}", scale)
        print(f"prepared the corpora in {time.perf_counter() - start:.0f} s (not timed below)")
        print(f"{'corpus':<14}{'contexts':>10}{'groups':>10}{'stage 1 s':>11}{'stage 2 s':>11}{'contexts/s':>12}"
              f"{'x I/O':>7}{'base MB':>9}{'peak MB':>9}")
        results = {}
        for name, folder in (("real", real), (f"synthetic x{scale}", synthetic)):
            r = results[name] = measure(folder, base / f"out-{name.split()[0]}")
            seconds = sum(r["seconds"])
            print(f"{name:<14}{sum(r['contexts']):>10}{sum(r['groups']):>10}{r['seconds'][0]:>11.2f}"
                  f"{r['seconds'][1]:>11.2f}{sum(r['contexts']) / seconds:>12.0f}{seconds / r['io_seconds']:>7.1f}"
                  f"{r['base_mb']:>9.0f}{r['peak_mb']:>9.0f}")
        small, large = results["real"], results[f"synthetic x{scale}"]
        memory = [max(r["peak_mb"] - r["base_mb"], 1) for r in (small, large)]
        print(f"growth for {sum(large['contexts']) / sum(small['contexts']):.1f}x the contexts: "
              f"time x{sum(large['seconds']) / sum(small['seconds']):.1f}, memory above base x{memory[1] / memory[0]:.1f}")
    sampler_bench()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("NORMALIZED", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, default=10, help="size of the synthetic corpus, in copies of the real one")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
    else:
        main(args.scale)
