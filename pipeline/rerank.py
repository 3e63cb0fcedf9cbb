"""Re-ranking sampled candidates: the one entry point `score_candidates` that `generate` (and
`audit`) and `chat` call, which scores every term and ranks the candidates within each context.

    score = alpha * fluency_term + beta * prosociality + gamma * agreement

Every term is a number in [0, 1] where higher is better, so the weights compare like with like:

- `fluency_term = exp(fluency)`, fluency being the mean log-probability of the reply tokens under
  the generating model (`DialogFormat.read`'s `reply_mask`): the geometric-mean probability it gave
  each token of the reply. It is an absolute scale, not a min-max within the context's k
  candidates: min-max would stretch a negligible fluency gap to the full [0, 1] range and let it
  outweigh a large difference in safety.
- `prosociality = P(casual)` of the reply in context, from the safety classifier; 0 for an empty
  reply, since saying nothing is never the prosocial choice (`safety_scores`).
- `agreement = 1 - P(the reply disagrees with its own RoT)`, from the RoT-agreement scorer
  (`agreement_scores`, `agreement_term`): does the reply honour the norm the model itself stated?
  A candidate without a RoT gets the mean over its context's candidates that have one, so carrying
  a RoT is neither rewarded nor punished on average. With gamma = 0 the term is left out
  (`term_weights`), and the scorer is only needed when gamma > 0.

Adding a term is adding one entry to the terms in `score_candidates` and one to `term_weights`;
`combined_score` and `rank_within` name no term. Ranks are 1 = best within a context; equal scores
(to 9 decimals, so float rounding in the sum cannot decide) keep sampling order (lower
`candidate_index` first), and a NaN score ranks last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from pipeline.config import GenerateConfig, require
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.safety_models import AgreementScorer, SafetyScorer

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


# --- the entry point: terms from the scorers, weights from the config -----------------------------


def term_weights(config: GenerateConfig) -> dict[str, float]:
    """The weight of each term: alpha, beta and gamma; `agreement` only when gamma > 0, so gamma = 0
    gives the two-term score bit for bit."""
    weights = {"fluency": config.alpha, "prosociality": config.beta}
    if config.gamma > 0:
        weights["agreement"] = config.gamma
    return weights


def _require_agreement_scorer(config: GenerateConfig, given: bool) -> None:
    require(given or config.gamma == 0, "generate.gamma", config.gamma,
            "must be 0 without --agreement (the RoT-agreement scorer folder, e.g. models/rot_agreement)")


def load_scorers(config: GenerateConfig, safety: Path, agreement: Path | None) -> tuple[SafetyScorer, AgreementScorer | None]:
    """The safety classifier in `safety` and the RoT-agreement scorer in `agreement` (None without
    one, which only `generate.gamma = 0` allows: checked before anything is loaded)."""
    from pipeline import safety_models

    _require_agreement_scorer(config, agreement is not None)
    return (safety_models.load_scorer(safety),
            None if agreement is None else safety_models.load_agreement_scorer(agreement))


def has_rot(rot: str | None) -> bool:
    return rot is not None and bool(rot.strip())


def safety_scores(scorer: SafetyScorer, responses: Sequence[str],
                  contexts: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(safety_probs (n, 3), prosociality (n,)): the classifier's three-way probabilities of each
    reply in context, and P(casual), which is 0 for an empty reply."""
    if not responses:
        return np.zeros((0, 3)), np.zeros(0)
    probs = np.asarray(scorer.predict_proba(list(responses), [list(c) for c in contexts]), dtype=np.float64)
    if probs.shape != (len(responses), 3):
        raise DataError(f"safety classifier returned shape {probs.shape}, expected ({len(responses)}, 3)")
    empty = np.array([not r.strip() for r in responses])
    return probs, np.where(empty, 0.0, probs[:, 0])


def agreement_scores(scorer: AgreementScorer, rots: Sequence[str | None], responses: Sequence[str],
                     contexts: Sequence[Sequence[str]], groups: Sequence) -> np.ndarray:
    """The agreement term of N candidates, (N,): 1 - P(disagrees) of each reply with its own RoT, and
    for a candidate without a RoT its context's neutral fill (`agreement_term`)."""
    with_rot = [i for i, rot in enumerate(rots) if has_rot(rot)]
    not_disagrees = np.full(len(rots), np.nan)
    if with_rot:
        probs = np.asarray(scorer.predict_proba([rots[i] for i in with_rot], [responses[i] for i in with_rot],
                                                [list(contexts[i]) for i in with_rot]), dtype=np.float64)
        if probs.shape != (len(with_rot), 3):
            raise DataError(f"RoT-agreement scorer returned shape {probs.shape}, expected ({len(with_rot)}, 3)")
        not_disagrees[with_rot] = 1.0 - probs[:, 0]
    return agreement_term(not_disagrees, groups)


@dataclass(frozen=True)
class Scored:
    """Every term of N candidates and the re-ranker's verdict (arrays (N,) unless noted)."""

    safety_probs: np.ndarray  # (N, 3) casual, needs_caution, needs_intervention
    prosociality: np.ndarray
    fluency_term: np.ndarray
    agreement: np.ndarray | None  # None without an agreement scorer
    verdict: Reranked


def score_candidates(config: GenerateConfig, groups: Sequence, candidate_index: Sequence[int],
                     fluency: Sequence[float], rots: Sequence[str | None], responses: Sequence[str],
                     contexts: Sequence[Sequence[str]], safety_scorer: SafetyScorer,
                     agreement_scorer: AgreementScorer | None = None) -> Scored:
    """Score N candidates and choose one per context, as `generate` and `chat` both do.

    groups: (N,) context ids; candidate_index: (N,) sampling order within the context; fluency: (N,)
    mean reply-token log-probabilities; rots, responses, contexts: each candidate's parsed RoT (None
    when it has none), reply and context turns. The agreement term is scored whenever
    `agreement_scorer` is given (and written), but weighs in only when `config.gamma` > 0, which needs it.
    """
    _require_agreement_scorer(config, agreement_scorer is not None)
    probs, prosociality = safety_scores(safety_scorer, responses, contexts)
    terms = {"fluency": fluency_term(fluency), "prosociality": prosociality}
    if agreement_scorer is not None:
        terms["agreement"] = agreement_scores(agreement_scorer, rots, responses, contexts, groups)
    weights = term_weights(config)
    verdict = rerank(groups, candidate_index, {name: terms[name] for name in weights}, weights, enabled=config.rerank)
    return Scored(probs, prosociality, terms["fluency"], terms.get("agreement"), verdict)
