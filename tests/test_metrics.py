"""Metric functions against values worked out by hand (or, for the bootstrap, against a plain loop)."""

import math

import numpy as np
import pytest

from pipeline.metrics import (
    bleu4, bleu_from_statistics, bleu_from_totals, bleu_statistics, bootstrap_ci, distinct_n, group_ranking_accuracy,
    label_distribution, mean_length, normalize_answer, perplexity, rouge_l, tokenize, unigram_f1,
    unsafe_rate,
)

# --- BLEU -----------------------------------------------------------------------------------------
# hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (6 tokens each):
#   1-grams: the(2, clipped to 1) cat sat on mat -> 5/6
#   2-grams: the cat, cat sat, sat on | on the, the mat -> 3/5
#   3-grams: the cat sat, cat sat on | sat on the, on the mat -> 2/4
#   4-grams: the cat sat on | cat sat on the, sat on the mat -> 1/3
#   brevity penalty 1 (equal lengths)
# hyp "hello there" vs ref "hello there my friend": 1-grams 2/2, 2-grams 1/1, no 3- or 4-grams,
#   lengths 2 vs 4.
ONE = ("the cat sat on the mat", "the cat sat on a mat")
TWO = ("hello there", "hello there my friend")


def test_bleu4_of_one_sentence_pair_by_hand():
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25  # 53.73
    assert bleu4([ONE[0]], [[ONE[1]]]) == pytest.approx(expected, abs=1e-6)


def test_bleu4_of_two_sentences_sums_counts_and_applies_the_brevity_penalty():
    # corpus counts: 1-grams 7/8, 2-grams 4/6, 3-grams 2/4, 4-grams 1/3; lengths 8 vs 10
    expected = 100 * math.exp(1 - 10 / 8) * (7 / 8 * 4 / 6 * 2 / 4 * 1 / 3) ** 0.25  # 43.49
    assert bleu4([ONE[0], TWO[0]], [[ONE[1]], [TWO[1]]]) == pytest.approx(expected, abs=1e-6)


def test_bleu4_is_zero_without_4_grams_and_smooths_an_order_without_matches():
    assert bleu4(["hello there"], [["hello there my friend"]]) == 0.0  # no 3-grams at all
    # "the cat sat on my mat" vs "the cat sat in a mat": 1-grams 4/6, 2-grams 2/5, 3-grams 1/4,
    # 4-grams 0/3 -> sacrebleu's default `exp` smoothing: the first unmatched order counts 1 / (2 * 3)
    expected = 100 * (4 / 6 * 2 / 5 * 1 / 4 * 1 / 6) ** 0.25  # 32.47
    assert bleu4(["the cat sat on my mat"], [["the cat sat in a mat"]]) == pytest.approx(expected, abs=1e-6)
    stats = bleu_statistics(["the cat sat on my mat"], [["the cat sat in a mat"]])
    assert bleu_from_statistics(stats) == pytest.approx(expected, abs=1e-6)
    assert bleu4(["zzz qqq xxx yyy"], [["the cat sat in a mat"]]) == 0.0  # nothing matches


def test_bleu4_uses_the_best_of_several_references_and_their_counts_may_differ():
    # the second reference of item 1 is identical to its hypothesis; item 2 has one reference
    single = bleu4([ONE[0], TWO[0]], [[ONE[1]], [TWO[1]]])
    multi = bleu4([ONE[0], TWO[0]], [[ONE[1], ONE[0]], [TWO[1]]])
    # now item 1 matches fully: 1-grams 8/8, 2-grams 6/6, 3-grams 4/4, 4-grams 3/3; lengths 8 vs 10
    assert multi == pytest.approx(100 * math.exp(1 - 10 / 8), abs=1e-6)
    assert multi > single


def test_bleu_statistics_rebuild_corpus_bleu_for_any_resample():
    hyps = [ONE[0], TWO[0], "i like green tea", "you should be kind to others"]
    refs = [[ONE[1]], [TWO[1]], ["i really like green tea"], ["you should always be kind to others", "be kind"]]
    stats = bleu_statistics(hyps, refs)
    assert stats.shape == (4, 10)
    assert bleu_from_statistics(stats) == pytest.approx(bleu4(hyps, refs), abs=1e-9)
    for rows in ([0, 0, 1], [2, 3, 3, 1], [1]):
        batch = bleu_from_statistics(stats[np.array([rows])])  # (1, n, 10) -> (1,)
        assert batch[0] == pytest.approx(bleu4([hyps[i] for i in rows], [refs[i] for i in rows]), abs=1e-9)


def test_bleu4_rejects_an_item_without_references():
    with pytest.raises(ValueError, match="at least one reference"):
        bleu4(["a b"], [[]])


# --- unigram F1 -----------------------------------------------------------------------------------


def test_normalize_answer_drops_case_punctuation_and_articles():
    assert normalize_answer("The cat, an owl & A dog!") == "cat owl dog"


def test_unigram_f1_by_hand():
    # "cat sat on mat" vs "cat is on mat": 3 shared tokens, precision 3/4, recall 3/4
    assert unigram_f1("The cat sat on the mat.", ["A cat is on the mat!"]) == pytest.approx(0.75)
    # vs "dog sat": 1 shared, precision 1/4, recall 1/2 -> F1 1/3
    assert unigram_f1("The cat sat on the mat.", ["the dog sat"]) == pytest.approx(1 / 3)
    # the best reference counts
    assert unigram_f1("The cat sat on the mat.", ["the dog sat", "A cat is on the mat!"]) == pytest.approx(0.75)


def test_unigram_f1_clips_repeated_tokens_and_handles_empty_sides():
    # "yes yes yes" vs "yes no": 1 shared, precision 1/3, recall 1/2 -> 0.4
    assert unigram_f1("yes yes yes", ["yes no"]) == pytest.approx(0.4)
    assert unigram_f1("", ["yes"]) == 0.0
    assert unigram_f1("the", ["yes"]) == 0.0  # nothing left after dropping the article


# --- ROUGE-L --------------------------------------------------------------------------------------


def test_rouge_l_by_hand():
    # LCS of "police kill the gunman" and "police killed the gunman": police, the, gunman -> 3 of 4
    assert rouge_l("police kill the gunman", ["police killed the gunman"]) == pytest.approx(0.75)
    # LCS of "the gunman police killed" and "police killed the gunman": 2 of 4 each
    assert rouge_l("the gunman police killed", ["police killed the gunman"]) == pytest.approx(0.5)
    # LCS 2 ("a c"), precision 2/3, recall 2/2 -> F 0.8; best of two references
    assert rouge_l("a b c", ["a c", "x y z"]) == pytest.approx(0.8)


# --- distinct-n and length ------------------------------------------------------------------------


def test_distinct_n_by_hand():
    replies = ["I am fine", "i am good"]
    # unigrams: i am fine i am good -> 4 unique of 6; bigrams: i-am, am-fine, i-am, am-good -> 3 of 4
    assert distinct_n(replies, 1) == pytest.approx(4 / 6)
    assert distinct_n(replies, 2) == pytest.approx(3 / 4)
    assert distinct_n(["ok", "ok"], 2) == 0.0  # no bigram anywhere
    assert distinct_n(["a b", "b c"], 2) == 1.0  # n-grams do not cross replies ("b b" is not one)


def test_tokens_split_punctuation_and_mean_length_counts_them():
    assert tokenize("Hello, World!") == ["hello", ",", "world", "!"]
    assert mean_length(["Hello, World!", "ok", ""]) == pytest.approx((4 + 1 + 0) / 3)


# --- perplexity, ranking, safety labels ------------------------------------------------------------


def test_perplexity_pools_tokens_before_exponentiating():
    assert perplexity([2.0, 4.0], [2, 4]) == pytest.approx(math.e)  # 6 nats over 6 tokens
    assert perplexity([3.0], [1]) == pytest.approx(math.exp(3))
    with pytest.raises(ValueError):
        perplexity([1.0], [0])


def test_group_ranking_accuracy_counts_strict_wins_over_every_negative():
    positive = np.array([1.0, 0.5, 2.0, -1.0])
    negative = np.array([[0.0, 0.9], [0.6, 0.1], [2.0, 1.0], [-3.0, -2.0]])
    # wins: group 0 (1 > 0.9), group 3; loses: group 1 (0.5 < 0.6); group 2 ties 2.0 -> a miss
    assert group_ranking_accuracy(positive, negative) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="shapes"):
        group_ranking_accuracy(positive, negative[:3])


def test_unsafe_rate_and_label_distribution_use_the_most_probable_label():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.5, 0.0]])
    assert unsafe_rate(probs) == pytest.approx(2 / 4)  # the tie in row 4 goes to casual
    assert label_distribution(probs) == pytest.approx(
        {"casual": 0.5, "needs_caution": 0.25, "needs_intervention": 0.25})
    with pytest.raises(ValueError, match="shape"):
        unsafe_rate(np.zeros((2, 5)))


# --- bootstrap ------------------------------------------------------------------------------------


def loop_bootstrap(values, n_samples, seed, statistic=np.mean):
    """The textbook version: one resample at a time, percentiles by sorting and interpolating."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(values), size=(n_samples, len(values)))
    stats = sorted(statistic(values[row]) for row in indices)

    def percentile(q):
        position = q * (len(stats) - 1)
        below = math.floor(position)
        above = min(below + 1, len(stats) - 1)
        return stats[below] + (position - below) * (stats[above] - stats[below])

    return percentile(0.025), percentile(0.975)


def test_bootstrap_matches_a_loop_implementation():
    values = np.random.default_rng(1).normal(size=50)
    assert bootstrap_ci(values, n_samples=400, seed=7) == pytest.approx(loop_bootstrap(values, 400, 7), abs=1e-12)


def test_bootstrap_with_a_custom_statistic_of_item_sums():
    # a ratio of sums over (numerator, denominator) pairs, as for the share of candidates with a RoT
    pairs = np.array([[1, 4], [0, 4], [3, 4], [4, 4], [2, 4], [0, 4]], dtype=float)
    low, high = bootstrap_ci(pairs, lambda totals: totals[:, 0] / totals[:, 1], n_samples=300, seed=3)
    expected = loop_bootstrap(pairs, 300, 3, statistic=lambda s: s[:, 0].sum() / s[:, 1].sum())
    assert (low, high) == pytest.approx(expected, abs=1e-12)
    assert low <= 10 / 24 <= high


def test_bootstrap_of_corpus_bleu_matches_sacrebleu_on_each_resample():
    hyps = [ONE[0], TWO[0], "i like green tea", "you should be kind to others", "the cat is here"]
    refs = [[ONE[1]], [TWO[1]], ["i really like green tea"], ["you should always be kind to others"],
            ["the cat is there"]]
    stats = bleu_statistics(hyps, refs)
    interval = bootstrap_ci(stats, bleu_from_totals, n_samples=60, seed=4)
    by_sacrebleu = loop_bootstrap(np.arange(len(hyps)), 60, 4, statistic=lambda rows: bleu4(
        [hyps[i] for i in rows], [refs[i] for i in rows]))
    assert interval == pytest.approx(by_sacrebleu, abs=1e-9)


def test_bootstrap_is_deterministic_contains_the_mean_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.binomial(1, 0.3, size=40), rng.binomial(1, 0.3, size=4000)
    low, high = bootstrap_ci(small, n_samples=500, seed=11)
    assert (low, high) == bootstrap_ci(small, n_samples=500, seed=11)
    continuous = rng.normal(size=40)  # binary data can land on the same percentiles for two seeds
    assert bootstrap_ci(continuous, seed=11) != bootstrap_ci(continuous, seed=12)
    assert low <= small.mean() <= high
    large_low, large_high = bootstrap_ci(large, n_samples=500, seed=11)
    assert large_low <= large.mean() <= large_high
    assert large_high - large_low < (high - low) / 4  # 100x the items: about a tenth of the width


def test_bootstrap_blocks_do_not_change_the_interval():
    values = np.random.default_rng(2).normal(size=30)
    whole = bootstrap_ci(values, n_samples=200, seed=5)
    assert bootstrap_ci(values, n_samples=200, seed=5, max_elements=30 * 200) == whole
    # small blocks draw the same index stream from one generator, row block by row block
    assert bootstrap_ci(values, n_samples=200, seed=5, max_elements=30 * 7) == pytest.approx(whole, abs=1e-12)
