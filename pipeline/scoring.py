"""Scoring a dialog model on n-pair groups: encoding groups, one batched forward pass per group,
and the ranking accuracy and perplexity that validation and the `score` stage report.

Shared by training (`train`), test-set scoring (`score`) and the stage-1 sampler of `mine`. The
positive's target is `<|rot|> RoT <|response|> reply</s>`; each negative is scored after the *same*
RoT, and a candidate's score covers only the reply tokens (from `<|response|>` on).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.config import TrainConfig
from pipeline.errors import DataError
from pipeline.losses import sequence_scores
from pipeline.modeling import (
    RESPONSE, DialogModel, Source, encode_sources, encode_targets, format_target, load_dialog_model,
    token_logprobs,
)
from pipeline.schemas import read_table

log = logging.getLogger(__name__)


# --- data -----------------------------------------------------------------------------------------


GROUP_COLUMNS = ("group_id", "context", "persona", "emotion", "positive", "rots", "negatives")


# --- data -----------------------------------------------------------------------------------------


def read_groups(folder: Path, split: str) -> pa.Table:
    """Read `<folder>/<split>.parquet`: the columns scoring needs, every group with the same
    number (at least one) of negatives."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: groups folder not found (it is written by the mine stage)")
    path = folder / f"{split}.parquet"
    table = read_table(path, GROUP_COLUMNS, allow_empty=False, what="groups")
    counts = pc.unique(pc.list_value_length(table["negatives"])).to_pylist()
    if len(counts) != 1 or not counts[0]:
        raise DataError(f"{path}: every group needs the same number (at least 1) of negatives, found {sorted(counts, key=str)}")
    return table


@dataclass
class EncodedGroups:
    """Token ids of a group table, ready for `token_logprobs`; candidate 0 is the positive."""

    source_ids: list[list[int]]  # (G,) one context per group
    target_ids: list[list[list[int]]]  # (G, C) positive, then the N = C - 1 negatives
    reply_starts: list[list[int]]  # (G, C) index of `<|response|>` in each target
    severity: torch.Tensor  # (G, N) float32

    def __len__(self) -> int:
        return len(self.source_ids)

    @property
    def negatives(self) -> int:
        return self.severity.shape[1]


def encode_groups(tokenizer, table: pa.Table, config: TrainConfig) -> EncodedGroups:
    """Format and tokenize every group: source from context/persona/emotion; the positive and each
    negative after the group's RoT (when `config.rot_target`)."""
    rows = table.to_pylist()
    sources = [Source(r["context"], r["persona"] or (), r["emotion"]) for r in rows]
    targets = [format_target(text, r["rots"] or (), config.rot_target)
               for r in rows for text in [r["positive"]] + [n["text"] for n in r["negatives"]]]
    source_ids = encode_sources(tokenizer, sources, config.max_source_tokens)
    flat_targets = encode_targets(tokenizer, targets, config.max_target_tokens)
    response = tokenizer.convert_tokens_to_ids(RESPONSE)
    C = len(flat_targets) // len(rows)
    target_ids = [flat_targets[g * C:(g + 1) * C] for g in range(len(rows))]
    # A RoT long enough to push `<|response|>` past max_target_tokens leaves only eos to compare.
    reply_starts = [[ids.index(response) if response in ids else len(ids) - 1 for ids in group] for group in target_ids]
    cut = sum(response not in ids for group in target_ids for ids in group)
    if cut:
        log.warning("%d of %d targets lost their reply to train.max_target_tokens = %d", cut, len(flat_targets),
                    config.max_target_tokens)
    severity = torch.tensor([[float(n["severity"]) for n in r["negatives"]] for r in rows], dtype=torch.float32)
    return EncodedGroups(source_ids, target_ids, reply_starts, severity)


# --- scoring --------------------------------------------------------------------------------------


class GroupScorer(torch.nn.Module):
    """The dialog model behind a single `forward`, so DDP and autocast see every call — the
    sequence-to-sequence encoder's included."""

    def __init__(self, dm: DialogModel):
        super().__init__()
        self.model = dm.model
        self.tokenizer, self.is_seq2seq = dm.tokenizer, dm.is_seq2seq

    def forward(self, source_ids, target_ids, candidates_per_source: int):
        dm = DialogModel(self.model, self.tokenizer, self.is_seq2seq)
        return token_logprobs(dm, source_ids, target_ids, candidates_per_source)


def score_batch(scorer, groups: EncodedGroups, batch: list[int], candidates: int, length_normalized: bool):
    """Score `candidates` targets (the positive first) of each group in `batch` in one forward pass.

    Returns `logps` (G, C, T) and `mask` (G, C, T) over the whole target, and `scores` (G, C): the
    sequence score of the reply tokens only (from `<|response|>` on).
    """
    sources = [groups.source_ids[g] for g in batch]
    targets = [ids for g in batch for ids in groups.target_ids[g][:candidates]]
    logps, mask = scorer(sources, targets, candidates)  # (G*C, T)
    G, T = len(batch), logps.shape[-1]
    logps, mask = logps.view(G, candidates, T), mask.view(G, candidates, T)
    starts = torch.tensor([groups.reply_starts[g][:candidates] for g in batch], device=mask.device)  # (G, C)
    reply_mask = mask * (torch.arange(T, device=mask.device) >= starts.unsqueeze(-1))  # (G, C, T)
    scores = sequence_scores(logps.flatten(0, 1), reply_mask.flatten(0, 1), length_normalized).view(G, candidates)
    return logps, mask, scores


VALIDATION_SUMS = ("groups", "ranked_first", "positive_score", "negative_score", "positive_nll", "positive_tokens")


@torch.no_grad()
def validation_sums(scorer, groups: EncodedGroups, indices: list[int], config: TrainConfig) -> torch.Tensor:
    """Sums over the groups `indices` in `VALIDATION_SUMS` order (float64), to add across processes."""
    sums = torch.zeros(len(VALIDATION_SUMS), dtype=torch.float64)
    candidates = 1 + groups.negatives
    for start in range(0, len(indices), config.eval_batch_groups):
        batch = indices[start:start + config.eval_batch_groups]
        logps, mask, scores = score_batch(scorer, groups, batch, candidates, config.length_normalized)
        scores = scores.double().cpu()
        sums += torch.stack([
            torch.tensor(float(len(batch)), dtype=torch.float64),
            (scores[:, :1] > scores[:, 1:]).all(dim=-1).double().sum(),  # ties do not count as ranked first
            scores[:, 0].sum(),
            scores[:, 1:].mean(dim=-1).sum(),
            -(logps[:, 0].double() * mask[:, 0]).sum().cpu(),
            mask[:, 0].sum().double().cpu(),
        ])
    return sums


def validation_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Group ranking accuracy, mean positive and negative reply scores, their gap, and the token-level
    perplexity of the positives' whole targets, from `validation_sums` (summed over processes)."""
    s = dict(zip(VALIDATION_SUMS, sums.tolist()))
    n = s["groups"]
    positive, negative = s["positive_score"] / n, s["negative_score"] / n
    return {
        "groups": int(n),
        "ranking_accuracy": s["ranked_first"] / n,
        "positive_score": positive,
        "negative_score": negative,
        "score_gap": positive - negative,
        "perplexity": math.exp(s["positive_nll"] / s["positive_tokens"]),
    }


def score_groups(dm: DialogModel, groups_table: pa.Table, config: TrainConfig) -> dict[str, float]:
    """Score a group table with a model, as validation does: `ranking_accuracy` (share of groups whose
    positive reply outscores every negative), mean `positive_score` and `negative_score` (a group's
    negatives averaged first), `score_gap`, and the positives' token-level `perplexity`."""
    groups = encode_groups(dm.tokenizer, groups_table, config)
    training = dm.model.training
    dm.model.eval()
    try:
        sums = validation_sums(GroupScorer(dm), groups, list(range(len(groups))), config)
    finally:
        dm.model.train(training)
    return validation_metrics(sums)


def load_init_model(init: Path) -> DialogModel:
    """Load a model folder; a missing folder or one the loader cannot read is a one-line DataError."""
    init = Path(init)
    if not init.is_dir():
        raise DataError(f"{init}: model folder not found")
    return load_dialog_model(init)
