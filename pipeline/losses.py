"""The training objective: cross-entropy on the prosocial reply plus a socially aware n-pair term.

Pure functions of tensors, shapes in each docstring. For a group of one context `c`, its positive
`y+` and N negatives `y_k-`, with sequence score `s(c, y)` (mean log-probability of `y`'s tokens):

    L_npair = log(1 + sum_k exp((s(c, y_k-) - s(c, y+) + m_k) / tau)),   m_k = margin * severity_k
    L       = CE(y+ | c) + lambda * L_npair

`L_npair` is the cross-entropy of a softmax over `[s+, s_1- + m_1, ..., s_N- + m_N] / tau` with the
positive as target (Sohn's n-pair loss with a temperature, InfoNCE-style); a margin makes a worse
negative (higher severity from the miner) have to sit further below the positive.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sequence_scores(token_logps: Tensor, mask: Tensor, length_normalized: bool = True) -> Tensor:
    """Score of each sequence from its token log-probabilities.

    `token_logps` (B, T) and `mask` (B, T), 1 on real tokens and 0 on padding (as returned by
    `modeling.token_logprobs`). Returns (B,): the mean log-probability of the real tokens, or their
    sum when `length_normalized` is False. Padded positions count for nothing, whatever they hold.
    """
    mask = mask.to(token_logps.dtype)
    summed = (token_logps * mask).sum(dim=-1)  # (B,)
    if not length_normalized:
        return summed
    return summed / mask.sum(dim=-1).clamp(min=1)


def severity_margins(severity: Tensor, margin: float) -> Tensor:
    """Per-negative margins `m_k = margin * severity_k`.

    `severity` (G, N): the miner's social-unacceptability weights in [0, 1]. Returns (G, N) in the
    severity's dtype; `margin = 0` gives zeros, which turns the margin off.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return severity * margin


def npair_loss(positive_scores: Tensor, negative_scores: Tensor, margins: Tensor,
               tau: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The socially aware n-pair loss, averaged over groups.

    `positive_scores` (G,), `negative_scores` (G, N), `margins` (G, N). Per group,
    `log(1 + sum_k exp((s_k- - s+ + m_k) / tau))`, computed as `logsumexp([0, z_1, ..., z_N])` so large
    scores neither overflow nor lose the gradient. Returns the scalar mean over the G groups and
    detached diagnostics (0-dim tensors): `positive_score` and `negative_score` (means),
    `score_gap` (mean positive minus mean negative score) and `ranking_accuracy` (share of groups
    whose positive outscores every negative; margins do not count here).
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    logits = (negative_scores - positive_scores.unsqueeze(-1) + margins) / tau  # (G, N)
    zero = torch.zeros_like(logits[:, :1])  # (G, 1): the `1 +` inside the log
    per_group = torch.logsumexp(torch.cat([zero, logits], dim=-1), dim=-1)  # (G,)
    with torch.no_grad():
        positive, negative = positive_scores.detach().float(), negative_scores.detach().float()
        diagnostics = {
            "positive_score": positive.mean(),
            "negative_score": negative.mean(),
            "score_gap": positive.mean() - negative.mean(),
            "ranking_accuracy": (positive.unsqueeze(-1) > negative).all(dim=-1).float().mean(),
        }
    return per_group.mean(), diagnostics


def cross_entropy(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Mean negative log-likelihood per real token over the batch.

    `token_logps` (B, T), `mask` (B, T) of the positives only. Every real token of the batch weighs
    the same (longer replies weigh more than in a per-sequence mean), as in the usual LM loss.
    Returns a scalar.
    """
    mask = mask.to(token_logps.dtype)
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def total_loss(ce: Tensor, npair: Tensor, contrastive_weight: float) -> Tensor:
    """`L = CE + lambda * L_npair` (scalars); `contrastive_weight = lambda = 0` is the CE-only ablation."""
    if contrastive_weight == 0:
        return ce  # not `ce + 0 * npair`: that would still turn an infinite n-pair term into NaN
    return ce + contrastive_weight * npair
