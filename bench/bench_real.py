"""Benchmark for sizing the experiment on real corpora (params.real.yaml) on this machine: the speed of
every model-bound piece of the headline run for the preset's scratch GPT-2 and two neighbours (fewer
and more layers), on the preset's own data (../shared/mirror, normalized and mined here into a
temporary folder; skipped without it), and the minutes each model-bound stage would take:

    (p) base_model's pretraining loop: tokens read per second;
    (c) train.fit, cross-entropy only, on stage-1 groups: groups per second;
    (n1), (n2) train.fit with the n-pair term on stage-1 and stage-2 groups: groups per second;
    (s) score's scoring of test groups (no gradient): groups per second;
    (g) generate's sampling (`generate.k` candidates, `generate.batch_size` contexts a call) of
        DiaSafety and DailyDialog test contexts: contexts per second.

Then, for the preset's size, each stage's predicted minutes: its count (pairs and tokens, groups after
`mine.stage<k>_max_groups`, contexts after `generate.max_contexts`) over the measured speed, the
validation passes of training included. Stages that do not depend on the model (download, normalize,
the classifiers, mining, evaluate, the audit) take about five minutes together and are not predicted.
Timings are wall clock with torch's default threads; on a machine shared with other jobs they are
pessimistic (two threads on two busy cores can be several times slower than one).

    python -m bench bench_real        (or python -m bench.bench_real)
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import CORPORA, load_all
from pipeline.finetune import pair_settings
from pipeline.modeling import DialogModel, Source
from pipeline.sampling import sample_candidates
from pipeline.scoring import GroupScorer, encode_groups, per_group_scores, read_groups
from pipeline.stages import base_model, download, generate, mine, normalize, safety, train

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "mirror"
PRESET = REPO / "params.real-scratch.yaml"  # the scratch model's sizing (issue 13)
PAIRS, GROUPS, CONTEXTS = 320, 96, 24  # measured per size; small enough for a few minutes in all
STAGES = ("base_model", "train_stage1", "train_stage1_ce", "train_stage2", "train_stage2_ce", "generate (each)",
          "score (each)")


def sample_rows(table: pa.Table, n: int, seed: int) -> pa.Table:
    keep = np.random.default_rng(seed).choice(table.num_rows, size=min(n, table.num_rows), replace=False)
    return table.take(pa.array(np.sort(keep)))


def prepare(params: dict, base: Path) -> dict:
    """The preset's corpora downloaded and normalized, the safety classifier and both stages' groups
    mined into `base`; returns the counts the predictions need."""
    corpora = dataclasses.replace(params["corpora"], mirror=str(MIRROR))
    for corpus in CORPORA:
        download.run(corpora, corpus, base / "raw" / corpus)
        normalize.run(params["normalize"], corpus, base / "raw" / corpus, base / "normalized" / corpus)
    safety.run(params["safety"], base / "normalized", base / "safety", base / "safety_reports")
    stats = {stage: mine.run(params["mine"], stage, base / "normalized", base / "safety", base / "groups" / f"stage{stage}",
                             stage1_groups=base / "groups" / "stage1", progress=False) for stage in (1, 2)}
    contexts = 0
    for corpus in CORPORA:
        distinct = generate.distinct_contexts(generate.read_test_rows(base / "normalized", corpus))
        contexts += min(len(distinct), params["generate"].max_contexts or len(distinct))
    groups = {(stage, split): stats[stage]["splits"][split]["rows_written"] for stage in (1, 2)
              for split in ("train", "validation", "test")}
    # score reads each test group once: stage 2's replayed stage-1 groups are already among stage 1's
    groups[(2, "test")] -= stats[2]["splits"]["test"].get("replayed", {}).get("groups", 0)
    replies = sum(labelled_count(base / "normalized" / c / "test.parquet") for c in ("diasafety", "toxichat"))
    return {"groups": groups, "contexts": contexts, "labelled_replies": replies}


def labelled_count(path: Path) -> int:
    """Replies with a human safety label in a normalized split: what score's likelihood safety scores."""
    from pipeline.schemas import read_table

    return sum(label is not None for label in read_table(path, ["reply_label"])["reply_label"].to_pylist())


def measure(model, tokenizer, params: dict, base: Path) -> dict[str, float]:
    """The speeds (p), (c), (n1), (n2), (s), (g) of one freshly copied model each."""
    import torch

    pretrain_config = dataclasses.replace(params["base_model"].pretrain, max_examples=PAIRS,
                                          max_validation_examples=32)
    speed = {"p": base_model.pretrain(copy.deepcopy(model), tokenizer, pretrain_config, base / "normalized")[1][
        "tokens_per_second"]}
    config, stage_config = params["train"], params["train_stage1"]
    for key, stage, weight in (("c", 1, 0.0), ("n1", 1, 1.0), ("n2", 2, 1.0)):
        settings = dataclasses.replace(config, contrastive_weight=weight, warmup_steps=2)
        groups = sample_rows(read_groups(base / "groups" / f"stage{stage}", "train"), GROUPS, seed=0)
        dm = DialogModel(copy.deepcopy(model), tokenizer, is_seq2seq=False)
        encoded = encode_groups(dm, groups, settings)
        held_out = encode_groups(dm, groups.slice(0, config.eval_batch_groups), settings)
        timing = train.fit(dm, encoded, held_out, settings, dataclasses.replace(stage_config, epochs=1),
                           train.make_accelerator(settings), desc=f"loop {key}")["timing"]
        speed[key] = len(encoded) / timing["train_seconds"]
    scorer = GroupScorer(DialogModel(model, tokenizer, is_seq2seq=False))
    test = encode_groups(DialogModel(model, tokenizer, is_seq2seq=False),
                         sample_rows(read_groups(base / "groups" / "stage1", "test"), GROUPS, 1), config)
    model.eval()
    started = time.perf_counter()
    with torch.no_grad():
        per_group_scores(scorer, test, list(range(len(test))), config)
    speed["s"] = len(test) / (time.perf_counter() - started)
    dm, gen = DialogModel(model, tokenizer, is_seq2seq=False), params["generate"]
    sources = []
    for corpus in ("diasafety", "daily_dialog"):
        rows = generate.distinct_contexts(generate.read_test_rows(base / "normalized", corpus))[:CONTEXTS]
        sources += [Source(r["context"], r["persona"] or (), r["emotion"]) for r in rows]
    started = time.perf_counter()
    for index, start in enumerate(range(0, len(sources), gen.batch_size)):
        sample_candidates(dm, sources[start:start + gen.batch_size], gen, index)
    speed["g"] = len(sources) / (time.perf_counter() - started)
    return speed


def predict(speed: dict[str, float], counts: dict, pair_tokens: float, params: dict) -> dict[str, float]:
    """Minutes per model-bound stage of the headline at these speeds (validation passes included)."""
    groups, pretrain = counts["groups"], params["base_model"].pretrain
    validation = {stage: 2 * groups[(stage, "validation")] / speed["s"] for stage in (1, 2)}  # before and after
    seconds = {
        "base_model": pretrain.max_examples * pair_tokens / speed["p"] + 2 * pretrain.max_validation_examples / 4 / speed["s"],
        "train_stage1": groups[(1, "train")] / speed["n1"] + validation[1],
        "train_stage1_ce": groups[(1, "train")] / speed["c"] + validation[1],
        "train_stage2": groups[(2, "train")] / speed["n2"] + validation[2],
        "train_stage2_ce": groups[(2, "train")] / speed["c"] + validation[2],
        "generate (each)": counts["contexts"] / speed["g"],
        # a labelled reply is one target against a group's n: about a quarter of a group
        "score (each)": (groups[(1, "test")] + groups[(2, "test")] + counts["labelled_replies"] / 4) / speed["s"],
    }
    return {stage: value / 60 for stage, value in seconds.items()}


def main() -> None:
    import torch

    if not MIRROR.is_dir():
        print(f"skipped: {MIRROR} is absent")
        return
    params = load_all(PRESET)
    size = params["base_model"]
    sizes = [(size.n_layer // 2, size.d_model), (size.n_layer, size.d_model), (size.n_layer + 2, size.d_model)]
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        started = time.perf_counter()
        counts = prepare(params, base)
        print(f"prepared the preset's data in {time.perf_counter() - started:.0f} s: groups {counts['groups']}, "
              f"{counts['contexts']} generation contexts, {counts['labelled_replies']} labelled test replies")
        texts, _ = base_model.training_texts(base / "normalized")
        results = {}
        for layers, width in sizes:
            config = dataclasses.replace(size, n_layer=layers, d_model=width, ffn_dim=4 * width,
                                         pretrain=dataclasses.replace(size.pretrain, enabled=False))
            model, tokenizer = base_model.build_scratch(config, texts)
            pairs = base_model.pretraining_pairs(base / "normalized", size.pretrain.corpora, "train", PAIRS, 0)[0]
            encoded = encode_groups(DialogModel(model, tokenizer, is_seq2seq=False), pairs, pair_settings(size.pretrain))
            pair_tokens = float(np.mean([len(p) + len(t[0]) for p, t in zip(encoded.prompt_ids, encoded.target_ids)]))
            speed = measure(model, tokenizer, params, base)
            results[(layers, width)] = (sum(p.numel() for p in model.parameters()) / 1e6, speed,
                                        predict(speed, counts, pair_tokens, params))
    print(f"scratch GPT-2, vocabulary {size.vocab_size}, {torch.get_num_threads()} CPU thread(s), wall clock")
    print(f"{'layers x width':>15} {'params':>7} {'(p) tok/s':>10} {'(c) g/s':>8} {'(n1) g/s':>9} {'(n2) g/s':>9} "
          f"{'(s) g/s':>8} {'(g) ctx/s':>10}")
    for (layers, width), (millions, speed, _) in results.items():
        print(f"{f'{layers} x {width}':>15} {millions:6.2f}M {speed['p']:10.0f} {speed['c']:8.1f} {speed['n1']:9.1f} "
              f"{speed['n2']:9.1f} {speed['s']:8.1f} {speed['g']:10.2f}")
    print("predicted minutes of the headline's model-bound stages (generate and score run once per model, 4 models):")
    print(f"{'layers x width':>15} " + " ".join(f"{stage:>16}" for stage in STAGES) + f" {'total':>8}")
    for (layers, width), (_, _, minutes) in results.items():
        total = sum(minutes[s] * (4 if "(each)" in s else 1) for s in STAGES)
        print(f"{f'{layers} x {width}':>15} " + " ".join(f"{minutes[s]:16.1f}" for s in STAGES) + f" {total:8.1f}")


if __name__ == "__main__":
    main()
