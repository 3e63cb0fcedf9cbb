"""score: how a model ranks the test groups, and how well it predicts the reference replies.

Reads one model folder and the test groups of both training stages
(`data/groups/stage1/test.parquet`, `data/groups/stage2/test.parquet`; a group replayed into stage 2
counts once), scores every group's positive and negatives exactly as training validation does
(`scoring.score_batch`, with the `train` section's format and score settings), and writes
`<out>/eval_scores.json`:

- `group_ranking_accuracy`: the share of test groups whose prosocial positive outscores every
  socially unacceptable negative, with a bootstrap 95% interval over groups;
- `reference_ppl`: token-level perplexity of the reference targets (RoT and reply) given their context.

The `evaluate` stage puts both next to the generation metrics of the same model.

    python -m pipeline score stage2 --model models/stage2 --groups data/groups --out reports/scores/stage2
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pyarrow as pa
import torch

from pipeline.artifacts import ensure_writable, staged_dir, write_json
from pipeline.config import EvaluateConfig, TrainConfig
from pipeline.metrics import bootstrap_ci
from pipeline.scoring import GroupScorer, encode_groups, load_init_model, read_groups, score_batch

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


@torch.no_grad()
def per_group_scores(dm, table: pa.Table, config: TrainConfig) -> tuple[list[bool], list[float], list[int]]:
    """Per group: whether the positive outranks every negative, the positive target's summed NLL,
    and its token count."""
    groups = encode_groups(dm.tokenizer, table, config)
    scorer = GroupScorer(dm)
    dm.model.eval()
    ranked_first, nll, tokens = [], [], []
    candidates = 1 + groups.negatives
    indices = list(range(len(groups)))
    for start in range(0, len(indices), config.eval_batch_groups):
        batch = indices[start:start + config.eval_batch_groups]
        logps, mask, scores = score_batch(scorer, groups, batch, candidates, config.length_normalized)
        ranked_first += (scores[:, :1] > scores[:, 1:]).all(dim=-1).tolist()  # ties do not count
        nll += (-(logps[:, 0].double() * mask[:, 0]).sum(dim=-1)).tolist()
        tokens += mask[:, 0].sum(dim=-1).long().tolist()
    return ranked_first, nll, tokens


def run(train_config: TrainConfig, evaluate_config: EvaluateConfig, name: str, model: Path, groups: Path,
        out: Path) -> dict:
    """Score the test groups with the model at `model`; write `<out>/eval_scores.json`."""
    started = time.time()
    ensure_writable(out)
    table = test_groups(Path(groups))
    dm = load_init_model(Path(model))
    ranked_first, nll, tokens = per_group_scores(dm, table, train_config)
    n = len(ranked_first)
    accuracy = sum(ranked_first) / n
    low, high = bootstrap_ci([float(r) for r in ranked_first], n_samples=evaluate_config.bootstrap_samples,
                             seed=evaluate_config.seed)
    scores = {
        "group_ranking_accuracy": {"value": accuracy, "ci": [low, high], "n": n},
        "reference_ppl": {"value": math.exp(sum(nll) / sum(tokens)), "n": sum(tokens)},
    }
    with staged_dir(out) as folder:
        write_json(scores, folder / "eval_scores.json")
    log.info("score %s: %d test groups, ranking accuracy %.3f [%.3f, %.3f], reference perplexity %.2f (%.1f s)",
             name, n, accuracy, low, high, scores["reference_ppl"]["value"], time.time() - started)
    return scores
