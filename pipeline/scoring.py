"""Scoring a dialog model on n-pair groups: encoding groups, one batched forward pass per group,
and the ranking accuracy and perplexity that validation and the `score` stage report.

Shared by training (`train`), test-set scoring (`score`) and the stage-1 sampler of `mine`. Groups
are written in the model's own format (`DialogModel.format`): the positive's target is its RoT then
its reply and eos (`<|rot|> RoT <|response|> reply</s>` in the markers; without eos when it is cut at
`train.max_target_tokens`); each negative is scored after the *same* RoT, and a candidate's score
covers only its reply's tokens and eos (not the RoT, not `<|response|>`).
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
from pipeline.modeling import DialogModel, Source, load_dialog_model, token_logprobs
from pipeline.schemas import read_table

log = logging.getLogger(__name__)


# --- data -----------------------------------------------------------------------------------------


# corpus and dialogue_id name a group's cluster (its dialogue) for intervals over test groups.
GROUP_COLUMNS = ("group_id", "corpus", "dialogue_id", "context", "persona", "emotion", "positive", "rots", "negatives")


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

    prompt_ids: list[list[int]]  # (G,) one prompt per group (`DialogFormat.prompts`)
    target_ids: list[list[list[int]]]  # (G, C) positive, then the N = C - 1 negatives
    reply_starts: list[list[int]]  # (G, C) index of the first reply token in each target
    severity: torch.Tensor  # (G, N) float32
    cut: torch.Tensor  # (G, C) bool: the target was cut at max_target_tokens (it has no eos)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def negatives(self) -> int:
        return self.severity.shape[1]

    def cut_counts(self) -> dict[str, int]:
        """How many positive and negative targets were cut at max_target_tokens."""
        return {"positives": int(self.cut[:, 0].sum()), "negatives": int(self.cut[:, 1:].sum())}


def encode_groups(dm: DialogModel, table: pa.Table, config: TrainConfig) -> EncodedGroups:
    """Format and tokenize every group in `dm`'s format: the prompt from context/persona/emotion; the
    positive and each negative after the group's RoT (when `config.rot_target`)."""
    tokenizer, rows = dm.tokenizer, table.to_pylist()
    sources = [Source(r["context"], r["persona"] or (), r["emotion"]) for r in rows]
    replies = [text for r in rows for text in [r["positive"]] + [n["text"] for n in r["negatives"]]]
    C = len(replies) // len(rows) if rows else 1
    rots = [r["rots"] or () for r in rows for _ in range(C)]
    prompt_ids = dm.format.prompts(tokenizer, sources, config.max_source_tokens, dm.is_seq2seq)
    targets = dm.format.targets(tokenizer, replies, rots, config.rot_target, config.max_target_tokens)
    target_ids = [targets.ids[g * C:(g + 1) * C] for g in range(len(rows))]
    reply_starts = [targets.reply_starts[g * C:(g + 1) * C] for g in range(len(rows))]
    # A RoT long enough to fill max_target_tokens leaves no reply to compare: the reply starts at the
    # cut target's end, so every candidate of the group (they share the RoT) scores 0 and they tie.
    lost = sum(start >= len(ids) for start, ids in zip(targets.reply_starts, targets.ids))
    if lost:
        log.warning("%d of %d targets lost their whole reply to train.max_target_tokens = %d (their RoT fills "
                    "it); their groups' candidates tie", lost, len(targets.ids), config.max_target_tokens)
    severity = torch.tensor([[float(n["severity"]) for n in r["negatives"]] for r in rows], dtype=torch.float32)
    cut = torch.tensor(targets.cut, dtype=torch.bool).view(len(rows), C)
    return EncodedGroups(prompt_ids, target_ids, reply_starts, severity, cut)


# --- scoring --------------------------------------------------------------------------------------


class GroupScorer(torch.nn.Module):
    """The dialog model behind a single `forward`, so DDP and autocast see every call — the
    sequence-to-sequence encoder's included."""

    def __init__(self, dm: DialogModel):
        super().__init__()
        self.model = dm.model
        self.tokenizer, self.is_seq2seq = dm.tokenizer, dm.is_seq2seq

    def forward(self, prompt_ids, target_ids, candidates_per_source: int):
        dm = DialogModel(self.model, self.tokenizer, self.is_seq2seq)
        return token_logprobs(dm, prompt_ids, target_ids, candidates_per_source)


def score_batch(scorer, groups: EncodedGroups, batch: list[int], candidates: int, length_normalized: bool):
    """Score `candidates` targets (the positive first) of each group in `batch` in one forward pass.

    Returns `logps` (G, C, T) and `mask` (G, C, T) over the whole target, and `scores` (G, C): the
    sequence score of the reply tokens only (and eos; not the RoT).
    """
    prompts = [groups.prompt_ids[g] for g in batch]
    targets = [ids for g in batch for ids in groups.target_ids[g][:candidates]]
    logps, mask = scorer(prompts, targets, candidates)  # (G*C, T)
    G, T = len(batch), logps.shape[-1]
    logps, mask = logps.view(G, candidates, T), mask.view(G, candidates, T)
    starts = torch.tensor([groups.reply_starts[g][:candidates] for g in batch], device=mask.device)  # (G, C)
    reply_mask = mask * (torch.arange(T, device=mask.device) >= starts.unsqueeze(-1))  # (G, C, T)
    scores = sequence_scores(logps.flatten(0, 1), reply_mask.flatten(0, 1), length_normalized).view(G, candidates)
    return logps, mask, scores


# --- ranking accuracy and perplexity --------------------------------------------------------------


PER_GROUP = ("ranked_first", "positive_score", "negative_score", "positive_nll", "positive_tokens")
VALIDATION_SUMS = ("groups", *PER_GROUP)


@torch.no_grad()
def per_group_scores(scorer, groups: EncodedGroups, indices: list[int], config: TrainConfig) -> dict[str, torch.Tensor]:
    """Score the groups `indices`, `config.eval_batch_groups` at a time; the one place that defines
    ranking and perplexity, for validation and the `score` stage alike.

    Returns, in `PER_GROUP` order, float64 tensors of shape (G,) on the CPU: `ranked_first` (1 when
    the positive's reply outscores every negative's; a tie does not count), `positive_score`,
    `negative_score` (the mean of the group's negatives), and the positive's whole target (RoT and
    reply) as `positive_nll` (summed) over `positive_tokens`.
    """
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in PER_GROUP}
    candidates = 1 + groups.negatives
    for start in range(0, len(indices), config.eval_batch_groups):
        batch = indices[start:start + config.eval_batch_groups]
        logps, mask, scores = score_batch(scorer, groups, batch, candidates, config.length_normalized)
        scores, logps, mask = scores.double().cpu(), logps[:, 0].double().cpu(), mask[:, 0].double().cpu()  # (G, C), (G, T)
        columns["ranked_first"].append((scores[:, :1] > scores[:, 1:]).all(dim=-1).double())
        columns["positive_score"].append(scores[:, 0])
        columns["negative_score"].append(scores[:, 1:].mean(dim=-1))
        columns["positive_nll"].append(-(logps * mask).sum(dim=-1))
        columns["positive_tokens"].append(mask.sum(dim=-1))
    return {name: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64) for name, parts in columns.items()}


def validation_sums(per_group: dict[str, torch.Tensor]) -> torch.Tensor:
    """`per_group_scores` summed, in `VALIDATION_SUMS` order (float64), to add across processes."""
    groups = per_group["ranked_first"].new_tensor(float(len(per_group["ranked_first"])))
    return torch.stack([groups, *(per_group[name].sum() for name in PER_GROUP)])


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


def load_init_model(init: Path) -> DialogModel:
    """Load a model folder; a missing folder or one the loader cannot read is a one-line DataError."""
    init = Path(init)
    if not init.is_dir():
        raise DataError(f"{init}: model folder not found")
    return load_dialog_model(init)
