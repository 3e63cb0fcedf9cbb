"""score: how a model ranks the test groups, and how well it predicts the reference replies.

Reads one model folder and the test groups of both training stages
(`data/groups/stage1/test.parquet`, `data/groups/stage2/test.parquet`; a group replayed into stage 2
counts once), scores every group exactly as training validation does (`scoring.per_group_scores`,
with the `train` section's format, score, batch and precision settings; on the GPU when there is
one), and writes `<out>/eval_scores.json`:

- `group_ranking_accuracy`: the share of test groups whose prosocial positive outscores every
  socially unacceptable negative, with a bootstrap 95% interval over groups;
- `reference_ppl`: token-level perplexity of the reference targets (RoT and reply) given their context.

The `evaluate` stage puts both next to the generation metrics of the same model.

    python -m pipeline score stage2 --model models/stage2 --groups data/groups --out reports/scores/stage2
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow as pa

from pipeline import devices
from pipeline.artifacts import ensure_writable, staged_dir, write_json
from pipeline.config import EvaluateConfig, TrainConfig
from pipeline.metrics import bootstrap_ci
from pipeline.scoring import (
    GroupScorer, encode_groups, load_init_model, per_group_scores, read_groups, validation_metrics, validation_sums,
)

log = logging.getLogger(__name__)


def test_groups(groups: Path) -> pa.Table:
    """The test groups of both stages, each group once (stage 2 replays some stage-1 groups)."""
    tables = [read_groups(groups / f"stage{k}", "test") for k in (1, 2)]
    table = pa.concat_tables(tables)
    seen, keep = set(), []
    for index, group_id in enumerate(table["group_id"].to_pylist()):
        if group_id not in seen:
            seen.add(group_id)
            keep.append(index)
    return table.take(keep)


def run(train_config: TrainConfig, evaluate_config: EvaluateConfig, name: str, model: Path, groups: Path,
        out: Path) -> dict:
    """Score the test groups with the model at `model`; write `<out>/eval_scores.json`."""
    started = time.time()
    ensure_writable(out)
    precision = devices.resolve_precision(train_config.precision, "train.precision")
    table = test_groups(Path(groups))
    dm = load_init_model(Path(model))
    device = devices.model_device()
    dm.model.to(device).eval()
    encoded = encode_groups(dm.tokenizer, table, train_config)
    with devices.autocast(device, precision):
        per_group = per_group_scores(GroupScorer(dm), encoded, list(range(len(encoded))), train_config)
    metrics = validation_metrics(validation_sums(per_group))
    # Groups of one dialogue (a ProsocialDialog conversation, a MIC question) are resampled together.
    clusters = [f"{c}/{d}" for c, d in zip(table["corpus"].to_pylist(), table["dialogue_id"].to_pylist())]
    low, high = bootstrap_ci(per_group["ranked_first"].tolist(), n_samples=evaluate_config.bootstrap_samples,
                             seed=evaluate_config.seed, clusters=clusters)
    tokens = int(per_group["positive_tokens"].sum())
    scores = {
        "group_ranking_accuracy": {"value": metrics["ranking_accuracy"], "ci": [low, high], "n": metrics["groups"],
                                   "n_clusters": len(set(clusters))},
        "reference_ppl": {"value": metrics["perplexity"], "n": tokens},
    }
    with staged_dir(out) as folder:
        write_json(scores, folder / "eval_scores.json")
    cut = encoded.cut_counts()
    log.info("score %s: %d test groups on %s (%s; %d positive and %d negative targets cut at "
             "train.max_target_tokens), ranking accuracy %.3f [%.3f, %.3f], reference perplexity %.2f (%.1f s)",
             name, metrics["groups"], device, precision, cut["positives"], cut["negatives"],
             metrics["ranking_accuracy"], low, high, metrics["perplexity"], time.time() - started)
    return scores
