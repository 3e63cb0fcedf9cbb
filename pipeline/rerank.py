"""Re-ranking sampled candidates: a weighted sum of per-candidate terms, ranked within each context.

    score = alpha * fluency_term + beta * prosociality + gamma * agreement

Every term is a number in [0, 1] where higher is better, so the weights compare like with like:

- `fluency_term = exp(mean token log-probability)`: the geometric-mean probability the generating
  model gave each token of the candidate (its per-token probability). It is an absolute scale, not
  a min-max within the context's k candidates: min-max would stretch a negligible fluency gap to the
  full [0, 1] range and let it outweigh a large difference in safety.
- `prosociality = P(casual)` of the reply in context, from the safety classifier.
- `agreement = 1 - P(the reply disagrees with its own RoT)`, from the RoT-agreement scorer
  (`agreement_term`): does the reply honour the norm the model itself stated? A candidate without
  a RoT gets the mean over its context's candidates that have one, so carrying a RoT is neither
  rewarded nor punished on average. With gamma = 0 the term is left out (`GenerateConfig.weights`).

Adding a term is adding one entry to `terms` and one to `weights`; nothing here names the terms.
Ranks are 1 = best within a context; equal scores (to 9 decimals, so float rounding in the sum
cannot decide) keep sampling order (lower `candidate_index` first), and a NaN score ranks last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

TIE_DECIMALS = 9  # scores that agree to this many decimals are ties
NO_ROT_AGREEMENT = 0.5  # agreement in a context where no candidate carries a RoT (the same for all)


def fluency_term(mean_logprob: np.ndarray) -> np.ndarray:
    """Per-token probability `exp(mean log-prob)` in [0, 1] from length-normalised log-likelihoods."""
    return np.exp(np.asarray(mean_logprob, dtype=np.float64))


def agreement_term(not_disagrees: np.ndarray, groups: Sequence) -> np.ndarray:
    """The agreement term in [0, 1] for N candidates.

    not_disagrees: (N,) 1 - P(disagrees) of each reply with its own RoT, NaN for a candidate without
    a RoT; groups: (N,) context ids. A NaN becomes the mean over the candidates of its context that
    have a RoT, or `NO_ROT_AGREEMENT` when none has (then every candidate of the context gets it and
    the term cannot change the ranking). A fixed neutral value instead would reward carrying any RoT
    whenever the scorer's typical agreement is above it, pushing casual replies towards moralising.
    Returns (N,) float64.
    """
    values = np.asarray(not_disagrees, dtype=np.float64)
    _, codes = np.unique(np.asarray(groups, dtype=object), return_inverse=True)
    has_rot = ~np.isnan(values)
    sums = np.bincount(codes, weights=np.where(has_rot, values, 0.0), minlength=codes.max(initial=-1) + 1)
    counts = np.bincount(codes, weights=has_rot.astype(np.float64), minlength=len(sums))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / counts, NO_ROT_AGREEMENT)
    return np.where(has_rot, values, means[codes])


def combined_score(terms: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """`sum_name weights[name] * terms[name]`, elementwise; `terms` and `weights` name the same terms.

    terms: name -> (N,) values in [0, 1]. Returns (N,) float64.
    """
    if not terms or set(terms) != set(weights):
        raise ValueError(f"terms {sorted(terms)} and weights {sorted(weights)} must name the same terms")
    arrays = {name: np.asarray(values, dtype=np.float64) for name, values in terms.items()}
    sizes = {a.shape for a in arrays.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise ValueError(f"every term must be one vector of the same length, got shapes {sorted(sizes)}")
    return sum(weights[name] * arrays[name] for name in sorted(arrays))


def rank_within(groups: Sequence, score: np.ndarray, candidate_index: np.ndarray) -> np.ndarray:
    """Rank candidates within each group by descending score (1 = best).

    groups: (N,) context ids; score: (N,); candidate_index: (N,) sampling order, the tie-break.
    A NaN score ranks after every real score. Returns (N,) int64.
    """
    score = np.asarray(score, dtype=np.float64)
    candidate_index = np.asarray(candidate_index)
    _, group_codes = np.unique(np.asarray(groups, dtype=object), return_inverse=True)
    key = np.where(np.isnan(score), np.inf, -score)  # ascending key: best first, NaN last
    order = np.lexsort((candidate_index, key, group_codes))
    ranks = np.empty(len(score), dtype=np.int64)
    sorted_groups = group_codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]  # first row of each group in `order`
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    ranks[order] = np.arange(len(order)) - group_start + 1
    return ranks


@dataclass(frozen=True)
class Reranked:
    """The re-ranker's verdict for N candidates (all arrays (N,))."""

    score: np.ndarray  # combined score, float64
    rank: np.ndarray  # 1 = best within its context, int64
    selected: np.ndarray  # True for the one candidate per context with rank 1


def rerank(groups: Sequence, candidate_index: Sequence[int], terms: Mapping[str, np.ndarray],
           weights: Mapping[str, float], enabled: bool = True) -> Reranked:
    """Score every candidate and choose one per context.

    groups: (N,) context ids (a context's k candidates share one); candidate_index: (N,) sampling
    order within the context; terms/weights: see `combined_score`. With `enabled` false (the
    no-re-ranking ablation) the score is still computed, but ranks follow sampling order, so the
    first sample is the one selected.
    """
    candidate_index = np.asarray(candidate_index, dtype=np.int64)
    score = combined_score(terms, weights)
    if enabled:
        # Scores equal up to float rounding in the sum (1.3 + 0.1 vs 1.4) are ties: sampling order decides.
        rank = rank_within(groups, np.round(score, TIE_DECIMALS), candidate_index)
    else:
        rank = rank_within(groups, np.zeros_like(score), candidate_index)
    return Reranked(score=score, rank=rank, selected=rank == 1)
