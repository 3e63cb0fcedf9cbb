"""Benchmark for sizing the scratch base model: training tokens per second of our loops for scratch
GPT-2s of three sizes (2 x 128, 4 x 256, 6 x 384; an 8k BPE vocabulary) on real DailyDialog text
(../shared/mirror, normalized here into a temporary folder; skipped without it), on this machine:

    (p) the base_model stage's pretraining loop (`base_model.pretrain`: cross-entropy on the pairs),
    (a) the training stages' loop (`train.fit`) with contrastive_weight = 0 on the same pairs,
    (b) `train.fit` with the n-pair term, n = 4 (each pair gets 3 replies of other pairs as negatives).

Tokens are every real token a forward pass reads (source, `<|bot|>`, target; (b) reads four targets
per source); timing covers the optimizer steps only. Each measurement runs `ROUNDS` times,
interleaved, and the median counts (a shared machine is noisy); (p) / (a) is the ratio of the two
cross-entropy loops, measured in the same run.

    python -m bench bench_base_model        (or python -m bench.bench_base_model)
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import BaseModelConfig, BaseModelPretrainConfig, CorporaConfig, NormalizeConfig, TrainStage1Config
from pipeline.finetune import pair_settings
from pipeline.modeling import DialogModel
from pipeline.scoring import encode_groups
from pipeline.stages import base_model, download, normalize, train

MIRROR = Path(__file__).resolve().parents[2] / "shared" / "mirror"
SIZES = ((2, 128, 4), (4, 256, 4), (6, 384, 6))  # layers, width, heads; the feed-forward is 4 x the width
VOCAB, PAIRS, BATCH, NEGATIVES, ROUNDS = 8000, 320, 32, 3, 3
# One intra-op thread, as bench_train: on a shared machine spinning threads make the timings swing several-fold.
THREADS = 1
PRETRAIN = BaseModelPretrainConfig(enabled=True, corpora=["daily_dialog"], epochs=1, max_examples=PAIRS,
                                   max_validation_examples=BATCH, batch_size=BATCH, precision="fp32")


def with_negatives(pairs: pa.Table, seed: int) -> pa.Table:
    """Each pair with NEGATIVES replies of other pairs as negatives (random severity): a stage-1-like group."""
    rng = np.random.default_rng(seed)
    replies = pairs["positive"].to_pylist()
    negatives = [[{"text": replies[j], "severity": float(rng.random())}
                  for j in rng.choice([k for k in range(len(replies)) if k != i], NEGATIVES, replace=False)]
                 for i in range(len(replies))]
    return pairs.set_column(pairs.schema.get_field_index("negatives"), "negatives", pa.array(negatives))


def measure(model, tokenizer, normalized: Path) -> dict[str, float]:
    """Tokens per second of (p), (a) and (b) for one freshly copied model each."""
    pairs = base_model.pretraining_pairs(normalized, PRETRAIN.corpora, "train", PAIRS, PRETRAIN.seed)[0]
    settings = pair_settings(PRETRAIN)
    ce = dataclasses.replace(settings, contrastive_weight=0.0, warmup_steps=2, eval_batch_groups=2 * BATCH)
    stage = TrainStage1Config(epochs=1, learning_rate=PRETRAIN.learning_rate)
    speed = {}
    speed["p"] = base_model.pretrain(copy.deepcopy(model), tokenizer, PRETRAIN, normalized)[1]["tokens_per_second"]
    for key, config, table in (("a", ce, pairs), ("b", dataclasses.replace(ce, contrastive_weight=1.0),
                                                  with_negatives(pairs, seed=0))):
        dm = DialogModel(copy.deepcopy(model), tokenizer, is_seq2seq=False)
        groups, held_out = (encode_groups(dm, t, config) for t in (table, table.slice(0, BATCH)))
        speed[key] = train.fit(dm, groups, held_out, config, stage, train.make_accelerator(config),
                               desc=f"loop {key}")["timing"]["tokens_per_second"]
    return speed


def main() -> None:
    import torch

    if not (MIRROR / "daily_dialog").is_dir():
        print(f"skipped: {MIRROR / 'daily_dialog'} is absent")
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        measure_all()
    finally:
        torch.set_num_threads(threads)


def measure_all() -> None:
    import torch
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        corpora = CorporaConfig(source="mirror", mirror=str(MIRROR))
        download.run(corpora, "daily_dialog", base / "raw" / "daily_dialog")
        normalized = base / "normalized"
        normalize.run(NormalizeConfig(), "daily_dialog", base / "raw" / "daily_dialog", normalized / "daily_dialog")
        texts, _ = base_model.training_texts(normalized)
        models = {}
        for layers, width, heads in SIZES:
            config = BaseModelConfig(vocab_size=VOCAB, n_layer=layers, d_model=width, n_head=heads, ffn_dim=4 * width)
            models[(layers, width)] = base_model.build_scratch(config, texts)
        runs: dict[tuple, list[dict]] = {size: [] for size in models}
        started = time.perf_counter()
        for _ in range(ROUNDS):
            for size, (model, tokenizer) in models.items():
                runs[size].append(measure(model, tokenizer, normalized))
    print(f"scratch GPT-2 on {PAIRS} DailyDialog train pairs (mirror), batch {BATCH}, max {PRETRAIN.max_source_tokens} "
          f"source + {PRETRAIN.max_target_tokens} target tokens, {torch.get_num_threads()} CPU thread(s), fp32, "
          f"median of {ROUNDS} ({time.perf_counter() - started:.0f} s in all)")
    print(f"{'layers x width':>15} {'parameters':>11} {'(p) pretrain':>13} {'(a) fit, CE':>12} {'(b) n-pair':>11} "
          f"{'p / a':>6}   tokens/s read")
    for (layers, width), (model, _) in models.items():
        median = {k: statistics.median(r[k] for r in runs[(layers, width)]) for k in ("p", "a", "b")}
        print(f"{f'{layers} x {width}':>15} {sum(p.numel() for p in model.parameters()) / 1e6:10.2f}M "
              f"{median['p']:13.0f} {median['a']:12.0f} {median['b']:11.0f} {median['p'] / median['a']:6.2f}")


if __name__ == "__main__":
    main()
