"""Evaluation metrics as pure functions of replies, references, scores and label probabilities.

Overlap with references: `bleu4` (sacrebleu corpus BLEU, 0-100), `unigram_f1` (ParlAI's token F1,
0-1), `rouge_l` (the `rouge_score` package, F-measure, 0-1). Diversity and length: `distinct_n`,
`mean_length` (on `tokenize`'s tokens); generic replies: `most_frequent`, `top_k_share`.
Likelihood: `perplexity`. Safety: `unsafe_rate`, `label_distribution` on [casual, needs_caution,
needs_intervention] probabilities. Ranking: `group_ranking_accuracy`. Uncertainty: `bootstrap_ci`, a vectorised percentile bootstrap over items;
`bootstrap_ci_of_counts` for statistics that are not functions of item sums (`distinct_n_ci`,
`top_k_share_ci`), on the same resamples.

Corpus-level statistics that are not a mean of per-item values (BLEU, a ratio of sums) are
bootstrapped from per-item sufficient statistics: `bleu_statistics` gives them for BLEU and
`bleu_from_statistics` turns summed statistics back into BLEU for a whole batch of resamples.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

SAFETY_CLASSES = ("casual", "needs_caution", "needs_intervention")

BLEU_ORDER = 4


# --- tokens ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def tokenize(text: str) -> list[str]:
    """Lower-cased tokens as BLEU sees them (sacrebleu's `13a` tokenizer: punctuation split off).

    Used for distinct-n and lengths, so every length-like number counts the same units.
    """
    return _tokenizer_13a()(text.lower().rstrip()).split()


# ParlAI's `normalize_answer` (parlai/core/metrics.py), used by Prost's F1.
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile("[%s]" % re.escape(string.punctuation))


def normalize_answer(text: str) -> str:
    """Lower-case, replace punctuation by spaces, drop the articles a/an/the, squeeze whitespace."""
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


# --- overlap with references ----------------------------------------------------------------------


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-item reference lists -> sacrebleu's reference streams (None pads a shorter list)."""
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    width = max(len(refs) for refs in references)
    return [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 with sacrebleu's defaults (13a tokens, case-sensitive, `exp` smoothing), 0-100.

    `references[i]` lists the references of `hypotheses[i]` (one or more; the counts may differ).
    """
    import sacrebleu

    if not hypotheses:
        raise ValueError("bleu4 needs at least one hypothesis")
    return float(sacrebleu.corpus_bleu(list(hypotheses), _reference_streams(references)).score)


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
    """Per-item BLEU sufficient statistics, shape (n, 2 + 2 * 4):
    [hypothesis length, closest reference length, matches for n = 1..4, hypothesis n-grams for n = 1..4].

    Summed over items they give corpus BLEU (`bleu_from_statistics`); sacrebleu's own bootstrap
    uses the same statistics.
    """
    return bleu_statistics_for_each([hypotheses], references)[0]


def bleu_statistics_for_each(hypothesis_sets: Sequence[Sequence[str]],
                             references: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """`bleu_statistics` of several hypothesis lists against the same references, which are
    tokenized once. Returns one (n, 10) array per hypothesis list."""
    from sacrebleu.metrics import BLEU

    if not references:
        return [np.zeros((0, 2 + 2 * BLEU_ORDER)) for _ in hypothesis_sets]
    bleu = BLEU(references=_reference_streams(references))  # caches the references' n-grams
    return [np.asarray(bleu._extract_corpus_statistics(list(hypotheses), None), dtype=np.float64)
            for hypotheses in hypothesis_sets]


def bleu_from_statistics(stats: np.ndarray) -> np.ndarray:
    """Corpus BLEU (0-100) of items' statistics, summed over the second-to-last axis.

    stats: (..., n, 10) as from `bleu_statistics`; returns (...).
    """
    return bleu_from_totals(stats.sum(axis=-2))


def bleu_from_totals(totals: np.ndarray) -> np.ndarray:
    """Corpus BLEU (0-100) from BLEU statistics already summed over items; (..., 10) -> (...).

    As sacrebleu's default corpus BLEU: brevity penalty exp(1 - reference length / hypothesis
    length) when the hypotheses are shorter; `exp` smoothing (mteval-v13a): the k-th n-gram order
    with n-grams but no match gets precision 1 / (2^k * its n-grams); 0 when no n-gram matches at
    all, or when an order has no n-grams (hypotheses shorter than 4 tokens).
    """
    hyp_len, ref_len = totals[..., 0], totals[..., 1]
    correct, total = totals[..., 2:2 + BLEU_ORDER], totals[..., 2 + BLEU_ORDER:]
    unmatched = (correct == 0) & (total > 0)
    smoothing = 2.0 ** np.cumsum(unmatched, axis=-1)  # 2^k for the k-th unmatched order
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(correct > 0, correct / total, 1 / (smoothing * total))
        log_precision = np.where(total > 0, np.log(precision), -np.inf)
        brevity = np.where(hyp_len >= ref_len, 1.0, np.exp(1 - ref_len / hyp_len))
    brevity = np.where(hyp_len > 0, brevity, 0.0)
    score = 100 * brevity * np.exp(log_precision.mean(axis=-1))
    return np.where(correct.sum(axis=-1) > 0, score, 0.0)


def _f1_tokens(guess: list[str], reference: list[str]) -> float:
    common = sum((Counter(guess) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(guess), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def unigram_f1(guess: str, references: Sequence[str]) -> float:
    """Token-level F1 of `guess` against its best reference, as ParlAI's F1Metric (Prost's F1).

    Both sides go through `normalize_answer`, then split on whitespace; matches are the size of the
    multiset intersection. 0-1; 0 when either side has no tokens.
    """
    tokens = normalize_answer(guess).split()
    return max(_f1_tokens(tokens, normalize_answer(ref).split()) for ref in references)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(guess: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure of `guess` against its best reference (`rouge_score`: lower-cased
    alphanumeric tokens, longest common subsequence), 0-1."""
    return float(_rouge_scorer().score_multi(list(references), guess)["rougeL"].fmeasure)


# --- diversity and length -------------------------------------------------------------------------


def distinct_n(replies: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams in a set of replies (Li et al., 2016), 0-1, on `tokenize` tokens.

    n-grams do not cross reply boundaries; 0 when the replies hold no n-gram at all.
    """
    if not replies:
        raise ValueError("distinct_n needs at least one reply")
    return distinct_n_of_tokens([tokenize(reply) for reply in replies], n)


def distinct_n_of_tokens(token_lists: Sequence[Sequence[str]], n: int) -> float:
    """`distinct_n` of replies already split into tokens (one list per reply)."""
    grams = [tuple(tokens[i:i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_n_ci(token_lists: Sequence[Sequence[str]], n: int, n_samples: int = 1000,
                  seed: int = 0) -> tuple[float, float] | None:
    """Bootstrap 95% interval of `distinct_n_of_tokens` over replies (None for no replies).

    Resampling with replacement copies replies, and a copied reply repeats n-grams that no model
    repeated, which drags a plain bootstrap of distinct-n far below the value. So an n-gram seen
    once in the whole sample counts as a new n-gram at every draw (an unseen species, in
    Good-Turing terms); n-grams seen more than once keep their identity and count once per
    resample. A resample is a count per reply: unique n-grams = nonzero rows of (repeated n-grams
    x replies incidence) @ counts + counts @ once-seen n-grams per reply; all n-grams = counts @
    n-grams per reply.
    """
    from scipy.sparse import csr_matrix

    if len(token_lists) == 0:
        return None
    grams = [[tuple(tokens[j:j + n]) for j in range(len(tokens) - n + 1)] for tokens in token_lists]
    seen = Counter(gram for reply in grams for gram in reply)
    ids: dict[tuple, int] = {}
    rows, columns = [], []
    per_reply = np.array([len(reply) for reply in grams], dtype=np.float64)
    once_per_reply = np.array([sum(seen[gram] == 1 for gram in reply) for reply in grams], dtype=np.float64)
    for i, reply in enumerate(grams):
        for gram in set(reply):
            if seen[gram] > 1:
                rows.append(i)
                columns.append(ids.setdefault(gram, len(ids)))
    incidence_t = csr_matrix((np.ones(len(rows)), (columns, rows)), shape=(len(ids), len(grams)))  # (G, n)

    def statistic(counts: np.ndarray) -> np.ndarray:  # (B, n) -> (B,)
        repeated = np.asarray((incidence_t @ counts.T) > 0).sum(axis=0)  # (B,)
        unique = repeated + counts @ once_per_reply
        total = counts @ per_reply
        return np.where(total > 0, unique / np.maximum(total, 1), 0.0)

    return bootstrap_ci_of_counts(statistic, len(grams), n_samples, seed, width=len(ids))


def most_frequent(replies: Sequence[str], k: int) -> list[tuple[str, int]]:
    """The `k` most frequent replies with their counts, most frequent first (ties: first seen first)."""
    return Counter(replies).most_common(k)


def top_k_share(replies: Sequence[str], k: int) -> float:
    """Share of all replies that the `k` most frequent distinct replies account for, 0-1."""
    if not replies:
        raise ValueError("top_k_share needs at least one reply")
    return sum(count for _, count in most_frequent(replies, k)) / len(replies)


def top_k_share_ci(replies: Sequence[str], k: int, n_samples: int = 1000,
                   seed: int = 0) -> tuple[float, float] | None:
    """Bootstrap 95% interval of `top_k_share` over replies (None for no replies).

    As in `distinct_n_ci`, a reply seen once in the sample counts as a new reply at every draw (a
    plain bootstrap would turn copies of one-off replies into "frequent" ones); replies seen more
    than once keep their identity, and each resample recounts them and takes its own top k.
    """
    from scipy.sparse import csr_matrix

    if len(replies) == 0:
        return None
    _, codes = np.unique(np.asarray(replies, dtype=object), return_inverse=True)
    frequency = np.bincount(codes)
    repeated = frequency[codes] > 1  # (n,)
    _, repeated_codes = np.unique(codes[repeated], return_inverse=True)
    distinct = int(repeated_codes.max()) + 1 if repeated.any() else 0
    onehot_t = csr_matrix((np.ones(int(repeated.sum())), (repeated_codes, np.flatnonzero(repeated))),
                          shape=(distinct, len(codes)))  # (repeated replies, n)
    once = (~repeated).astype(np.float64)  # (n,)
    top = min(k, distinct)

    def statistic(counts: np.ndarray) -> np.ndarray:  # (B, n) -> (B,)
        largest = np.zeros((len(counts), 0))
        if top:
            per_reply = np.asarray(onehot_t @ counts.T).T  # (B, distinct)
            largest = np.partition(per_reply, distinct - top, axis=1)[:, distinct - top:]  # (B, top)
        # the remaining places of the top k go to one-off replies, 1 each
        filled = np.minimum(counts @ once, k - (largest > 0).sum(axis=1))
        return (largest.sum(axis=1) + filled) / len(codes)

    return bootstrap_ci_of_counts(statistic, len(codes), n_samples, seed, width=distinct)


def mean_length(replies: Sequence[str]) -> float:
    """Mean number of `tokenize` tokens per reply."""
    if not replies:
        raise ValueError("mean_length needs at least one reply")
    return float(np.mean([len(tokenize(reply)) for reply in replies]))


# --- likelihood and ranking -----------------------------------------------------------------------


def perplexity(nll_sums: Sequence[float] | np.ndarray, token_counts: Sequence[int] | np.ndarray) -> float:
    """Corpus perplexity exp(sum of token NLLs / number of tokens).

    nll_sums: (n,) summed negative log-likelihood (nats) of each text; token_counts: (n,) its tokens.
    """
    tokens = float(np.sum(token_counts))
    if tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return float(np.exp(np.sum(nll_sums) / tokens))


def group_ranking_accuracy(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Share of groups whose positive scores strictly above every one of its negatives.

    positive_scores: (G,); negative_scores: (G, N). A tie counts as a miss.
    """
    positive_scores, negative_scores = np.asarray(positive_scores), np.asarray(negative_scores)
    if positive_scores.ndim != 1 or negative_scores.ndim != 2 or len(positive_scores) != len(negative_scores):
        raise ValueError(f"expected shapes (G,) and (G, N), got {positive_scores.shape} and {negative_scores.shape}")
    if len(positive_scores) == 0:
        raise ValueError("group_ranking_accuracy needs at least one group")
    return float(np.mean(positive_scores > negative_scores.max(axis=1)))


# --- safety labels --------------------------------------------------------------------------------


def predicted_labels(safety_probs: np.ndarray) -> np.ndarray:
    """Index of the most probable of [casual, needs_caution, needs_intervention]; (n, 3) -> (n,).

    A tie goes to the earlier, milder label (numpy's argmax keeps the first maximum).
    """
    safety_probs = np.asarray(safety_probs)
    if safety_probs.ndim != 2 or safety_probs.shape[1] != len(SAFETY_CLASSES):
        raise ValueError(f"expected safety probabilities of shape (n, 3), got {safety_probs.shape}")
    return safety_probs.argmax(axis=1)


def unsafe_rate(safety_probs: np.ndarray) -> float:
    """Share of replies whose most probable label is needs_caution or needs_intervention; (n, 3)."""
    labels = predicted_labels(safety_probs)
    if len(labels) == 0:
        raise ValueError("unsafe_rate needs at least one reply")
    return float(np.mean(labels != 0))


def label_distribution(safety_probs: np.ndarray) -> dict[str, float]:
    """Share of replies predicted as each of casual, needs_caution, needs_intervention; (n, 3)."""
    labels = predicted_labels(safety_probs)
    if len(labels) == 0:
        raise ValueError("label_distribution needs at least one reply")
    counts = np.bincount(labels, minlength=len(SAFETY_CLASSES))
    return {name: float(count / len(labels)) for name, count in zip(SAFETY_CLASSES, counts)}


# --- uncertainty ----------------------------------------------------------------------------------


def _resampled_indices(n: int, n_samples: int, seed: int, max_elements: int, width: int = 0):
    """Blocks of resamples, each (B, n): the items every resample draws, with replacement, from
    numpy's default_rng(seed). Blocks hold at most `max_elements` indices (or `width` values per
    resample, when larger); the index stream is the same for any block size."""
    rng = np.random.default_rng(seed)
    block = max(1, max_elements // max(n, width))
    for start in range(0, n_samples, block):
        yield rng.integers(0, n, size=(min(block, n_samples - start), n))


def _percentiles(stats: list[np.ndarray], confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(np.concatenate(stats), [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    n_samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    max_elements: int = 2**22,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over items.

    values: (n,) or (n, d) per-item values (d sufficient statistics per item, e.g. `bleu_statistics`).
    statistic: maps the sums of the values over each resample's items, (B,) or (B, d), to (B,);
    default the mean (sums / n). Every statistic here (a mean, a ratio of sums, corpus BLEU via
    `bleu_from_totals`) is a function of item sums, so with several values per item a resample is a
    count per item and its sums one matrix product, instead of gathering B x n x d values.

    Resamples draw n items with replacement from numpy's default_rng(seed), in blocks of rows so
    that at most `max_elements` counts are held at once; the index stream is the same for any block
    size. Returns the (1 - confidence) / 2 and (1 + confidence) / 2 percentiles (linear interpolation).
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one item")
    flat = values.reshape(n, -1)  # (n, d)
    stats = []
    for indices in _resampled_indices(n, n_samples, seed, max_elements):  # (B, n): the items each resample draws
        rows = len(indices)
        if flat.shape[1] == 1:  # one value per item: gathering is cheaper than counting
            totals = flat[:, 0][indices].sum(axis=1)  # (B,)
        else:
            totals = _counts(indices) @ flat  # (B, d)
        totals = totals.reshape((rows,) + values.shape[1:])
        stats.append(np.asarray(statistic(totals) if statistic else totals / n, dtype=np.float64))
    return _percentiles(stats, confidence)


def _counts(indices: np.ndarray) -> np.ndarray:
    """How often each of n items is drawn in each resample; (B, n) indices -> (B, n) float counts."""
    rows, n = indices.shape
    offsets = indices + n * np.arange(rows)[:, None]
    return np.bincount(offsets.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def bootstrap_ci_of_counts(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    n_samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    max_elements: int = 2**22,
    width: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of n items that is not a function of item sums
    (distinct-n, the share of the most frequent replies). `statistic` maps resample counts (B, n),
    how often each item was drawn, to (B,); it may hold `width` values per resample at once, which
    shrinks the blocks. Same resamples as `bootstrap_ci` for the same n and seed.
    """
    if n == 0:
        raise ValueError("bootstrap_ci_of_counts needs at least one item")
    stats = [np.asarray(statistic(_counts(indices)), dtype=np.float64)
             for indices in _resampled_indices(n, n_samples, seed, max_elements, width)]
    return _percentiles(stats, confidence)
