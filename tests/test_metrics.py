"""Metric functions against values worked out by hand (or, for the bootstraps, against a plain loop)."""

import math

import numpy as np
import pytest

from pipeline import metrics
from pipeline.metrics import (
    bleu_from_totals, bleu_statistics_for_each, bootstrap_ci, bootstrap_ci_of_counts, distinct_n_ci,
    distinct_n_of_tokens, mcnemar_exact, normalize_answer, paired_bootstrap_ci, point_estimate, predicted_labels,
    rouge_l, tokenize, top_k_share_ci, unigram_f1,
)


def bleu4(hypotheses, references):
    """Corpus BLEU-4 (0-100) the way evaluate computes it: summed per-item statistics."""
    return float(bleu_from_totals(bleu_statistics(hypotheses, references).sum(axis=0)))


def bleu_statistics(hypotheses, references):
    return bleu_statistics_for_each([hypotheses], references)[0]


def sacrebleu_bleu4(hypotheses, references):
    """sacrebleu's own corpus BLEU, the independent implementation."""
    import sacrebleu

    width = max(len(refs) for refs in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    return sacrebleu.corpus_bleu(list(hypotheses), streams).score


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
    assert bleu4(["zzz qqq xxx yyy"], [["the cat sat in a mat"]]) == 0.0  # nothing matches


def test_bleu4_uses_the_best_of_several_references_and_their_counts_may_differ():
    # the second reference of item 1 is identical to its hypothesis; item 2 has one reference
    single = bleu4([ONE[0], TWO[0]], [[ONE[1]], [TWO[1]]])
    multi = bleu4([ONE[0], TWO[0]], [[ONE[1], ONE[0]], [TWO[1]]])
    # now item 1 matches fully: 1-grams 8/8, 2-grams 6/6, 3-grams 4/4, 4-grams 3/3; lengths 8 vs 10
    assert multi == pytest.approx(100 * math.exp(1 - 10 / 8), abs=1e-6)
    assert multi > single


def test_bleu_statistics_rebuild_sacrebleus_corpus_bleu_for_any_resample():
    hyps = [ONE[0], TWO[0], "i like green tea", "you should be kind to others"]
    refs = [[ONE[1]], [TWO[1]], ["i really like green tea"], ["you should always be kind to others", "be kind"]]
    stats = bleu_statistics(hyps, refs)
    assert stats.shape == (4, 10)
    assert bleu4(hyps, refs) == pytest.approx(sacrebleu_bleu4(hyps, refs), abs=1e-9)
    for rows in ([0, 0, 1], [2, 3, 3, 1], [1]):
        batch = bleu_from_totals(stats[np.array([rows])].sum(axis=1))  # (1, n, 10) summed -> (1,)
        assert batch[0] == pytest.approx(sacrebleu_bleu4([hyps[i] for i in rows], [refs[i] for i in rows]), abs=1e-9)


def test_bleu_statistics_reject_an_item_without_references():
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


# --- distinct-n and tokens -----------------------------------------------------------------------


def distinct_n(replies, n):
    return distinct_n_of_tokens([tokenize(reply) for reply in replies], n)


def test_distinct_n_by_hand():
    replies = ["I am fine", "i am good"]
    # unigrams: i am fine i am good -> 4 unique of 6; bigrams: i-am, am-fine, i-am, am-good -> 3 of 4
    assert distinct_n(replies, 1) == pytest.approx(4 / 6)
    assert distinct_n(replies, 2) == pytest.approx(3 / 4)
    assert distinct_n(["ok", "ok"], 2) == 0.0  # no bigram anywhere
    assert distinct_n(["a b", "b c"], 2) == 1.0  # n-grams do not cross replies ("b b" is not one)


def test_tokens_split_punctuation_and_lower_case():
    assert tokenize("Hello, World!") == ["hello", ",", "world", "!"]
    assert tokenize("") == []


# --- safety labels --------------------------------------------------------------------------------


def test_predicted_labels_take_the_most_probable_and_a_tie_goes_to_the_milder():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.5, 0.0]])
    assert predicted_labels(probs).tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="shape"):
        predicted_labels(np.zeros((2, 5)))


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
    by_sacrebleu = loop_bootstrap(np.arange(len(hyps)), 60, 4, statistic=lambda rows: sacrebleu_bleu4(
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


def test_bootstrap_without_clusters_is_unchanged_by_naming_every_item_its_own_cluster():
    values = np.random.default_rng(6).normal(size=(25, 3))
    ratio = lambda totals: totals[:, 0] / (1 + np.abs(totals[:, 1]))  # noqa: E731
    labels = [f"dialogue-{i}" for i in range(25)]  # not in sorted order ("dialogue-10" < "dialogue-2")
    by_items = bootstrap_ci(values[:, 0], n_samples=300, seed=2)
    assert bootstrap_ci(values[:, 0], n_samples=300, seed=2, clusters=labels) == by_items
    assert bootstrap_ci(values, ratio, 300, 2, clusters=labels) == pytest.approx(bootstrap_ci(values, ratio, 300, 2),
                                                                                 abs=1e-12)


# --- cluster bootstrap ----------------------------------------------------------------------------


def loop_cluster_bootstrap(values, clusters, n_samples, seed, statistic=np.mean):
    """The textbook cluster bootstrap: draw clusters (numbered in order of first appearance) with
    replacement, concatenate their rows, apply the statistic, one resample at a time."""
    order = list(dict.fromkeys(clusters))
    rows_of = [[i for i, c in enumerate(clusters) if c == cluster] for cluster in order]
    draws = np.random.default_rng(seed).integers(0, len(order), size=(n_samples, len(order)))
    stats = [statistic(values[[i for cluster in draw for i in rows_of[cluster]]]) for draw in draws]
    return tuple(np.percentile(stats, [2.5, 97.5]))


def test_cluster_bootstrap_matches_a_loop_that_draws_whole_clusters():
    rng = np.random.default_rng(8)
    clusters = [f"d{int(c)}" for c in rng.integers(0, 12, size=40)]  # 12 dialogues of uneven size
    values = rng.normal(size=40)
    got = bootstrap_ci(values, n_samples=300, seed=4, clusters=clusters)
    assert got == pytest.approx(loop_cluster_bootstrap(values, clusters, 300, 4), abs=1e-12)
    # a ratio of sums, as the RoT share of candidates: (numerator, denominator) per item
    pairs = np.stack([rng.integers(0, 4, size=40), np.full(40, 4)], axis=1).astype(float)
    got = bootstrap_ci(pairs, lambda totals: totals[:, 0] / totals[:, 1], 300, 4, clusters=clusters)
    expected = loop_cluster_bootstrap(pairs, clusters, 300, 4,
                                      statistic=lambda rows: rows[:, 0].sum() / rows[:, 1].sum())
    assert got == pytest.approx(expected, abs=1e-12)


def test_all_items_in_one_cluster_give_a_degenerate_interval():
    values = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    # every resample draws the one cluster, i.e. all five items: the mean is always 3/5
    assert bootstrap_ci(values, clusters=["q"] * 5) == pytest.approx((0.6, 0.6))
    assert bootstrap_ci(values) != pytest.approx((0.6, 0.6))  # the item bootstrap does vary


def test_items_of_one_cluster_move_together():
    values = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    seen = []

    def record_sums(totals):  # the sums of every resample
        seen.append(totals.copy())
        return totals

    bootstrap_ci(values, record_sums, n_samples=200, seed=0, clusters=["a", "a", "a", "b", "b", "b"])
    sums = np.concatenate(seen)
    # a resample draws two clusters: a+a, a+b or b+b, so the sum is 6, 3 or 0, never a mix of rows
    assert set(sums.tolist()) == {0.0, 3.0, 6.0}


def test_a_cluster_bootstrap_is_wider_when_items_of_a_cluster_agree():
    # 20 dialogues of 10 turns each, every turn of a dialogue the same outcome: 200 items, 20 independent ones
    outcomes = np.random.default_rng(9).binomial(1, 0.5, size=20).astype(float)
    values, clusters = np.repeat(outcomes, 10), np.repeat(np.arange(20), 10)
    row_low, row_high = bootstrap_ci(values, n_samples=1000, seed=0)
    low, high = bootstrap_ci(values, n_samples=1000, seed=0, clusters=clusters)
    # the item bootstrap treats 200 items as independent: about 1/sqrt(10) of the honest width
    assert high - low > 2.5 * (row_high - row_low)
    assert low <= values.mean() <= high


def test_cluster_bootstrap_rejects_labels_of_the_wrong_length():
    with pytest.raises(ValueError, match="one cluster label per item"):
        bootstrap_ci([1.0, 2.0, 3.0], clusters=["a", "b"])


def test_count_bootstraps_draw_clusters_too():
    token_lists = [["a", "b"], ["a", "b"], ["c"], ["d", "e"], ["a"]]
    clusters = ["x", "x", "y", "z", "z"]
    seen = []

    def record_counts(counts):
        seen.append(counts.copy())
        return counts.sum(axis=1)

    bootstrap_ci_of_counts(record_counts, 5, n_samples=100, seed=1, clusters=clusters)
    counts = np.concatenate(seen)
    assert (counts[:, 0] == counts[:, 1]).all() and (counts[:, 3] == counts[:, 4]).all()
    assert counts.sum(axis=1).min() < counts.sum(axis=1).max()  # a resample's size varies with its clusters
    # distinct-1 on one cluster: every resample repeats the same replies, so the interval is degenerate
    assert distinct_n_ci(token_lists, 1, clusters=["q"] * 5) == pytest.approx((5 / 8, 5 / 8))
    # all replies different and in one cluster: the top-2 share is 2/5 in every resample
    assert top_k_share_ci(["r1", "r2", "r3", "r4", "r5"], 2, clusters=["q"] * 5) == pytest.approx((0.4, 0.4))


# --- paired bootstrap and McNemar -----------------------------------------------------------------


def test_paired_bootstrap_of_means_is_the_bootstrap_of_per_item_differences():
    rng = np.random.default_rng(10)
    baseline = rng.binomial(1, 0.5, size=60).astype(float)
    model = np.where(rng.random(60) < 0.2, 0.0, baseline)  # the model fixes a fifth of the unsafe replies
    clusters = rng.integers(0, 25, size=60)
    paired = paired_bootstrap_ci(model, baseline, n_samples=500, seed=3, clusters=clusters)
    # the difference of two means on the same draws is the mean of the per-item differences
    assert paired == pytest.approx(bootstrap_ci(model - baseline, n_samples=500, seed=3, clusters=clusters), abs=1e-12)


def test_paired_bootstrap_of_corpus_bleu_matches_a_loop_over_resamples():
    hyps_a = [ONE[0], TWO[0], "i like green tea", "you should be kind to others", "the cat is here"]
    hyps_b = [ONE[1], "hello", "i like tea", "be kind", "the cat is there"]
    refs = [[ONE[1]], [TWO[1]], ["i really like green tea"], ["you should always be kind to others"],
            ["the cat is there"]]
    stats_a, stats_b = bleu_statistics_for_each([hyps_a, hyps_b], refs)
    clusters = ["d1", "d1", "d2", "d3", "d3"]
    got = paired_bootstrap_ci(stats_a, stats_b, bleu_from_totals, n_samples=60, seed=5, clusters=clusters)

    def difference(rows):
        rows = [int(i) for i in rows]
        return (sacrebleu_bleu4([hyps_a[i] for i in rows], [refs[i] for i in rows])
                - sacrebleu_bleu4([hyps_b[i] for i in rows], [refs[i] for i in rows]))

    assert got == pytest.approx(loop_cluster_bootstrap(np.arange(5), clusters, 60, 5, statistic=difference), abs=1e-9)
    assert point_estimate(stats_a, bleu_from_totals) == pytest.approx(sacrebleu_bleu4(hyps_a, refs), abs=1e-9)


def test_pairing_sees_a_difference_that_two_separate_intervals_hide():
    # 40 contexts: the baseline is unsafe on 20, the model on 15 of those same 20 and nowhere else
    baseline = np.array([1.0] * 20 + [0.0] * 20)
    model = np.array([1.0] * 15 + [0.0] * 25)
    low, high = bootstrap_ci(baseline, n_samples=1000, seed=0)
    assert low < model.mean() < high  # the old rule: the model's value inside the baseline's interval
    paired_low, paired_high = paired_bootstrap_ci(model, baseline, n_samples=1000, seed=0)
    assert paired_high < 0  # paired: 5 contexts improved, none worsened
    assert paired_low <= -5 / 40


def test_paired_bootstrap_needs_the_same_items():
    with pytest.raises(ValueError, match="same n"):
        paired_bootstrap_ci([1.0, 0.0], [1.0])


def test_mcnemar_exact_by_hand():
    # 5 discordant pairs, all one way: p = 2 * (1/2)^5
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    # 8 vs 2: p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_exact(3, 3) == 1.0  # 2 * P(X <= 3 | 6) = 2 * 42/64 > 1, capped
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pair: no evidence
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


@pytest.mark.parametrize("reply, reason", [
    ("", "empty"), ("   ", "empty"), ("...!?", "empty"),
    ("soon soon soon soon soon", "repetitive"), ("the the the cat", "repetitive"), ("ha ha ha ha", "repetitive"),
    ("?? !! 12 34 ##", "not_words"),
    ("I agree with you.", None), ("no no", None),  # short replies are not called repetitive
    ("Yes, yes, yes, I will!", None),  # 3 of 5 words: at the threshold, not above it
    ("I think it is what it is, you know.", None), ("42", None),
])
def test_degenerate_reason_by_hand(reply, reason):
    assert metrics.degenerate_reason(reply) == reason
