"""Likelihood safety (`pipeline/likelihood.py`): the AUC of safe over unsafe replies and the
same-context pairs ranked right, by hand and against scikit-learn, with their cluster-bootstrap
intervals; the paired comparison of two models on the same replies, and how `evaluate` reports it."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import likelihood
from pipeline.config import EvaluateConfig
from pipeline.errors import DataError
from pipeline.metrics import pair_outcomes, same_context_pairs, separation_auc, separation_auc_ci
from pipeline.schemas import LIKELIHOOD
from pipeline.stages import evaluate

# --- metrics.separation_auc, same_context_pairs, pair_outcomes -----------------------------------------


def test_separation_auc_by_hand():
    # safe 3, 1, 2 against unsafe 2, 0: 3>2, 3>0, 1<2, 1>0, 2=2 (half), 2>0 -> 4.5 of 6 pairs.
    assert separation_auc([3, 1, 2, 2, 0], [True, True, True, False, False]) == pytest.approx(0.75)
    assert separation_auc([1, 1, 1, 1], [True, False, True, False]) == pytest.approx(0.5)  # all tied
    assert separation_auc([5, 4, 1, 0], [True, True, False, False]) == 1.0
    assert separation_auc([0, 1, 4, 5], [True, True, False, False]) == 0.0


def test_separation_auc_agrees_with_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores, safe = rng.integers(0, 6, 300).astype(float), rng.random(300) < 0.3  # many ties
    assert separation_auc(scores, safe) == pytest.approx(roc_auc_score(safe, scores))


def test_separation_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes, got 3 positive and 0 negative"):
        separation_auc([1.0, 2.0, 3.0], [True, True, True])
    with pytest.raises(ValueError, match="NaN"):
        separation_auc([1.0, float("nan")], [True, False])


def test_a_resample_weighs_each_reply_by_its_draws():
    from pipeline.metrics import _weighted_separation

    scores, safe = np.array([3.0, 1.0, 2.0, 2.0, 0.0]), np.array([True, True, True, False, False])
    counts = np.array([[2, 0, 1, 3, 1], [0, 1, 1, 0, 0]], dtype=float)
    drawn = np.repeat(np.arange(5), counts[0].astype(int))
    assert _weighted_separation(scores, safe, counts)[0] == pytest.approx(separation_auc(scores[drawn], safe[drawn]))
    assert np.isnan(_weighted_separation(scores, safe, counts)[1])  # no unsafe reply drawn


def test_separation_auc_interval():
    scores, safe = [3, 1, 2, 2, 0, 1.5], [True, True, True, False, False, False]
    value = 6.5 / 9  # 3 beats all three unsafe, 1 beats 0, 2 ties 2 and beats 0 and 1.5
    assert separation_auc(scores, safe) == pytest.approx(value)
    # One cluster: every resample is the whole sample.
    assert separation_auc_ci(scores, safe, 200, clusters=["a"] * 6) == pytest.approx((value, value))
    # Two clusters, one all safe and one all unsafe: half the resamples have one class only and are left
    # out; the others hold both clusters, whose AUC is the sample's.
    assert separation_auc_ci(scores, safe, 200, clusters=[0, 0, 0, 1, 1, 1]) == pytest.approx((value, value))
    low, high = separation_auc_ci(scores, safe, 500, seed=1)
    assert low < value < high
    # Paired: the same scores, or the same shifted (the order is the same), differ by 0 on every resample.
    assert separation_auc_ci(scores, safe, 200, baseline_scores=scores) == (0.0, 0.0)
    assert separation_auc_ci(scores, safe, 200, baseline_scores=np.array(scores) - 7) == (0.0, 0.0)
    reversed_low, reversed_high = separation_auc_ci(scores, safe, 500, seed=1, baseline_scores=-np.array(scores))
    assert reversed_low < 2 * value - 1 < reversed_high  # AUC(-s) = 1 - AUC(s)


def test_same_context_pairs_by_hand():
    first, second = same_context_pairs([True, False, True, False, False, True], ["a", "a", "b", "a", "c", "c"])
    assert first.tolist() == [0, 0, 5] and second.tolist() == [1, 3, 4]
    assert pair_outcomes([1.0, 2.0, 2.0], [0.0, 2.0, 3.0]).tolist() == [1.0, 0.5, 0.0]
    assert [len(side) for side in same_context_pairs([True, False], ["a", "b"])] == [0, 0]


# --- the records of one model --------------------------------------------------------------------------


def scored(rows: list[tuple]) -> pa.Table:
    """LIKELIHOOD rows from (corpus, dialogue_id, context, label, score)."""
    return pa.Table.from_pylist([
        {"corpus": corpus, "reply_id": f"{dialogue}/{i}", "dialogue_id": dialogue,
         "context_id": likelihood.context_id([context]), "context": [context], "reply": f"reply {i}",
         "reply_label": label, "reply_category": None, "responder": None, "score": value, "tokens": 3, "cut": False}
        for i, (corpus, dialogue, context, label, value) in enumerate(rows)], schema=LIKELIHOOD)


def test_likelihood_records_by_hand():
    table = scored([
        ("diasafety", "A", "ctx a", "safe", -1.0), ("diasafety", "A", "ctx a", "unsafe", -2.0),
        ("diasafety", "B", "ctx b", "safe", -3.0), ("diasafety", "C", "ctx c", "unsafe", -0.5),
        ("toxichat", "t0", "thread", "safe", -1.5), ("toxichat", "t0", "thread", "safe", -0.5),
    ])
    result = likelihood.likelihood_safety(table, n_samples=200, seed=0)
    auc, pairs = result["likelihood_auc"], result["same_context_pairs"]
    assert list(auc) == ["diasafety", "toxichat", "overall"]
    # diasafety: safe -1, -3 against unsafe -2, -0.5: only -1 > -2 -> 1 of 4.
    assert auc["diasafety"]["value"] == pytest.approx(0.25)
    assert (auc["diasafety"]["n"], auc["diasafety"]["n_safe"], auc["diasafety"]["n_clusters"]) == (4, 2, 3)
    # overall compares pairs within a corpus only: toxichat has no unsafe reply, so it adds no pair (the
    # old pooled AUC compared its safe -1.5 and -0.5 with DiaSafety's unsafe replies: 3.5 of 8).
    assert auc["overall"]["value"] == pytest.approx(0.25) and auc["overall"]["stratified"]
    assert auc["overall"]["ci"][0] <= auc["overall"]["value"] <= auc["overall"]["ci"][1]
    assert auc["toxichat"] == {"value": None, "ci": None, "n": 2, "n_safe": 2, "n_unsafe": 0, "n_clusters": 1,
                               "reason": "no unsafe reply"}
    # One context with both labels (diasafety's "ctx a"), ranked right.
    assert pairs["diasafety"] == {"value": 1.0, "ci": [1.0, 1.0], "n": 1, "n_contexts": 1, "n_clusters": 1}
    assert pairs["overall"]["value"] == 1.0 and pairs["overall"]["n"] == 1
    assert pairs["toxichat"]["value"] is None and "no context has both" in pairs["toxichat"]["reason"]


def test_contexts_of_two_corpora_never_pair():
    table = scored([("diasafety", "A", "same words", "safe", -1.0), ("toxichat", "t0", "same words", "unsafe", -2.0)])
    result = likelihood.likelihood_safety(table, 200, 0)
    assert result["same_context_pairs"]["overall"]["n"] == 0
    assert result["likelihood_auc"]["overall"]["value"] is None  # the AUC pairs no replies of two corpora either
    assert result["likelihood_auc"]["overall"]["reason"] == "no corpus has both a safe and an unsafe reply"


def test_the_overall_auc_pools_the_pairs_of_each_corpus():
    """DiaSafety: safe -1 beats unsafe -2 (1 of 1 pair); ToxiChat: safe -3, -4 against unsafe -1 (0 of 2):
    1 of 3 pairs. Pooled across corpora it would be (1 + 0.5 + 0 + 0) / 6 (the safe -1 ties ToxiChat's
    unsafe -1, ToxiChat's safe replies lose to DiaSafety's unsafe -2)."""
    table = scored([("diasafety", "A", "a", "safe", -1.0), ("diasafety", "B", "b", "unsafe", -2.0),
                    ("toxichat", "t0", "t", "safe", -3.0), ("toxichat", "t1", "u", "safe", -4.0),
                    ("toxichat", "t2", "v", "unsafe", -1.0)])
    auc = likelihood.likelihood_safety(table, 200, 0)["likelihood_auc"]
    assert auc["diasafety"]["value"] == 1.0 and auc["toxichat"]["value"] == 0.0
    assert auc["overall"]["value"] == pytest.approx(1 / 3)
    assert separation_auc([-1.0, -2.0, -3.0, -4.0, -1.0], [True, False, True, True, False]) == pytest.approx(1.5 / 6)


# --- two models on the same replies ---------------------------------------------------------------------

ROWS = [("diasafety", "A", "ctx a", "safe"), ("diasafety", "A", "ctx a", "unsafe"), ("diasafety", "B", "ctx b", "safe"),
        ("diasafety", "C", "ctx c", "unsafe")]


def with_scores(values, rows=ROWS) -> pa.Table:
    return scored([row + (value,) for row, value in zip(rows, values)])


def test_compare_by_hand():
    model = with_scores([-1.0, -2.0, -3.0, -0.5])  # AUC 1 of 4 (-1 > -2); its pair ranked right
    # safe -2, -0.5 against unsafe -1, -3: -2 > -3, -0.5 > -1, -0.5 > -3 -> 3 of 4; its pair ranked wrong.
    baseline = with_scores([-2.0, -1.0, -0.5, -3.0])
    compared, unmatched = likelihood.compare(model, baseline, n_samples=300, seed=0)
    auc, pairs = compared["likelihood_auc"]["diasafety"], compared["same_context_pairs"]["diasafety"]
    assert unmatched == 0 and (auc["value"], auc["baseline"]) == (pytest.approx(0.25), pytest.approx(0.75))
    assert auc["n"] == 4 and auc["n_clusters"] == 3 and auc["ci"][0] <= -0.5 <= auc["ci"][1]
    assert pairs == {"value": 1.0, "baseline": 0.0, "ci": (1.0, 1.0), "n": 1, "n_clusters": 1}
    assert compared["likelihood_auc"]["overall"]["value"] == pytest.approx(0.25)
    # A model against itself differs by exactly 0 on every resample.
    same, _ = likelihood.compare(model, model, n_samples=300, seed=0)
    assert same["likelihood_auc"]["diasafety"]["ci"] == (0.0, 0.0)


def test_compare_matches_replies_and_leaves_out_the_unmatched():
    extra = ROWS + [("toxichat", "t0", "thread", "unsafe")]
    model = with_scores([-1.0, -2.0, -3.0, -0.5, -9.0], extra)
    baseline = with_scores([-2.0, -1.0, -0.5, -3.0]).take([3, 2, 1, 0])  # the same replies in another order
    compared, unmatched = likelihood.compare(model, baseline, n_samples=200, seed=0)
    assert unmatched == 1 and list(compared["likelihood_auc"]) == ["diasafety", "overall"]
    assert compared["likelihood_auc"]["diasafety"]["baseline"] == pytest.approx(0.75)  # matched by reply, not row
    relabelled = with_scores([-1.0, -2.0, -3.0, -0.5], [("diasafety", "A", "ctx a", "unsafe")] + ROWS[1:])
    with pytest.raises(DataError, match="1 replies have another human label"):
        likelihood.compare(model, relabelled, 200, 0)


def test_evaluate_reports_the_likelihood_comparison(tmp_path):
    for model, values in (("ce", [-2.0, -1.0, -0.5, -3.0]), ("stage2", [-1.0, -2.0, -3.0, -0.5])):
        (tmp_path / model).mkdir()
        pq.write_table(with_scores(values), tmp_path / model / "likelihood.parquet")
        (tmp_path / model / "eval_scores.json").write_text(json.dumps(
            {"reference_ppl": 7.5, "likelihood_auc": {"overall": {"value": 0.5}}, "same_context_pairs": {}}))
    # eval_scores.json's likelihood keys are accepted and left to read_likelihood.
    assert evaluate.read_model_scores(tmp_path, ["ce", "stage2"]) == {"ce": {"reference_ppl": 7.5},
                                                                       "stage2": {"reference_ppl": 7.5}}
    replies = evaluate.read_likelihood(tmp_path, ["base", "ce", "stage2"])
    assert sorted(replies) == ["ce", "stage2"]
    notes: list[str] = []
    found = evaluate.likelihood_results(EvaluateConfig(bootstrap_samples=200), replies, notes)
    assert found["baseline"] == "ce" and notes == []
    assert found["metrics"]["stage2"]["likelihood_auc"]["diasafety"]["value"] == pytest.approx(0.25)
    entry = found["comparisons"]["stage2"]["diasafety"]["likelihood_auc"]
    assert (entry["value"], entry["baseline"], entry["difference"]) == (0.25, 0.75, -0.5)
    assert entry["higher_is_better"] is True and entry["n"] == 4 and "ce" not in found["comparisons"]
    flat = evaluate.flat_metrics({"metrics": {}, "comparisons": {"baseline": "ce", "headline": [], "models": {}},
                                  "likelihood": found})
    assert flat["stage2/diasafety/likelihood_auc"] == pytest.approx(0.25)
    assert flat["stage2_vs_ce/overall/likelihood_auc"] == pytest.approx(-0.5)
    assert flat["stage2_vs_ce/diasafety/same_context_pairs"] == pytest.approx(1.0)
    without_baseline = evaluate.likelihood_results(EvaluateConfig(bootstrap_samples=200), {"stage2": replies["stage2"]},
                                                   notes)
    assert without_baseline["comparisons"] == {} and "the baseline ce has no likelihood.parquet" in notes[0]
