"""The judge as the evaluation uses it (`pipeline.judging`) and the two measures of agreement it needs:
Cohen's kappa of two verdicts and the pairwise order of two scorings (`pipeline.metrics`), by hand and
against scikit-learn / scipy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FakeJudge, write_classifier_records

from pipeline import metrics as M
from pipeline.errors import DataError
from pipeline.judging import judge_provenance, judge_replies, provenance, safety_provenance, stage1_provenance

# --- Cohen's kappa --------------------------------------------------------------------------------


@pytest.mark.parametrize("cells, expected", [
    ((20, 5, 10, 15), 0.4),  # p_o = 35/50, r1 = 30/50, r2 = 25/50, p_e = 1/2: (0.7 - 0.5) / 0.5
    ((2, 0, 0, 2), 1.0),  # perfect agreement
    ((0, 2, 2, 0), -1.0),  # perfect disagreement with balanced labels: p_o 0, p_e 1/2
    ((0, 0, 2, 2), 0.0),  # the second rater never says positive: p_o = p_e = 1/2
    ((1, 1, 1, 1), 0.0),  # chance agreement
])
def test_cohen_kappa_by_hand(cells, expected):
    assert float(M.cohen_kappa(np.array(cells, dtype=float))) == pytest.approx(expected)


def test_cohen_kappa_is_nan_where_both_raters_are_constant_and_it_works_on_stacks():
    assert np.isnan(M.cohen_kappa(np.array([0.0, 0.0, 0.0, 4.0])))  # every item negative to both
    assert np.isnan(M.cohen_kappa(np.zeros(4)))  # no items
    stacked = M.cohen_kappa(np.array([[20, 5, 10, 15], [3, 0, 0, 0]], dtype=float))  # (2, 4) -> (2,)
    assert stacked.shape == (2,) and stacked[0] == pytest.approx(0.4) and np.isnan(stacked[1])


def test_cohen_kappa_matches_scikit_learn_on_random_verdicts():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        first, second = rng.random(30) < 0.4, rng.random(30) < 0.6
        totals = M.confusion_counts(first, second).sum(axis=0)
        assert float(M.cohen_kappa(totals)) == pytest.approx(cohen_kappa_score(first, second))


# --- order agreement ------------------------------------------------------------------------------


def test_order_agreement_by_hand():
    # pairs (0, 1): both up, concordant; (0, 2): reference up, estimate down, discordant; (1, 2): both down
    result = M.order_agreement([0.1, 0.3, 0.2], [0.2, 0.5, 0.1])
    assert (result["pairs"], result["ordered"], result["concordant"], result["discordant"]) == (3, 3, 2, 1)
    assert result["agreement"] == pytest.approx(2 / 3) and result["kendall_tau_b"] == pytest.approx(1 / 3)


def test_order_agreement_with_ties():
    # (0, 1) tied by the reference (not ordered); (0, 2) concordant; (1, 2) ordered, tied by the estimate.
    # tau_b = (1 - 0) / sqrt(2 untied by the reference * 2 untied by the estimate) = 1/2
    result = M.order_agreement([0.1, 0.1, 0.3], [0.2, 0.4, 0.4])
    assert (result["ordered"], result["concordant"], result["discordant"], result["estimate_ties"]) == (2, 1, 0, 1)
    assert result["agreement"] == pytest.approx(1 / 2) and result["kendall_tau_b"] == pytest.approx(1 / 2)


def test_order_agreement_matches_scipy_and_handles_too_few_items():
    from scipy.stats import kendalltau

    rng = np.random.default_rng(1)
    for _ in range(20):
        reference, estimate = rng.integers(0, 4, 6) / 4, rng.integers(0, 4, 6) / 4  # ties on purpose
        tau = M.order_agreement(reference, estimate)["kendall_tau_b"]
        expected = kendalltau(reference, estimate).statistic
        assert (tau is None and np.isnan(expected)) or tau == pytest.approx(expected)
    single = M.order_agreement([0.3], [0.4])
    assert (single["pairs"], single["agreement"], single["kendall_tau_b"]) == (0, None, None)
    with pytest.raises(ValueError, match="two \\(n,\\) arrays"):
        M.order_agreement([0.1, 0.2], [0.1])


# --- judging replies ------------------------------------------------------------------------------


def test_judge_replies_in_one_call_unsafe_from_the_threshold_on():
    judge = FakeJudge({"a": 0.5, "b": 0.49, "c": 0.9})
    p_unsafe, unsafe = judge_replies(judge, ["a", "b", "c", "d"], [["hi"], ["hi", "there"], ["x"], ["y"]], 0.5, "f")
    assert p_unsafe.tolist() == [0.5, 0.49, 0.9, 0.1] and unsafe.tolist() == [True, False, True, False]
    assert judge.calls == [(["a", "b", "c", "d"], [["hi"], ["hi", "there"], ["x"], ["y"]])]
    assert judge_replies(judge, [], [], 0.5, "f")[0].shape == (0,) and len(judge.calls) == 1


def test_a_judge_with_wrong_output_is_a_data_error():
    class Wrong:
        def predict_unsafe(self, responses, contexts):
            return np.full(len(responses), 1.5)

    with pytest.raises(DataError, match="^some.parquet: the judge returned \\(2,\\) values for 2 replies"):
        judge_replies(Wrong(), ["a", "b"], [["x"], ["y"]], 0.5, "some.parquet")


# --- what trained whom ----------------------------------------------------------------------------


def test_provenance_reads_the_three_records(tmp_path):
    judge, safety, stats = write_classifier_records(tmp_path)
    found = provenance(judge, safety, stats)
    assert found["judge"] == {"folder": str(judge), "kind": "tfidf", "corpora": ["diasafety", "toxichat"],
                              "training_examples": {"diasafety": 9, "toxichat": 6},
                              "training_unsafe": {"diasafety": 4, "toxichat": 2},
                              "independent_of": ["prosocial_dialog", "mic"]}
    assert found["self_assessed"]["corpora"] == ["prosocial_dialog", "mic"]
    assert found["stage1_negatives"]["groups_per_corpus"] == {"diasafety": 3, "prosocial_dialog": 7}
    # the safety classifier's corpora follow its config: no MIC examples, no MIC
    record = json.loads((safety / "scorer.json").read_text())
    record["config"] = {"response_examples": ["pd_responses"]}
    (safety / "scorer.json").write_text(json.dumps(record))
    assert safety_provenance(safety)["corpora"] == ["prosocial_dialog"]


def test_a_bad_record_is_one_line_naming_the_file(tmp_path):
    judge, safety, stats = write_classifier_records(tmp_path)
    record = json.loads((judge / "scorer.json").read_text())
    del record["training_examples"]
    (judge / "scorer.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="judge/scorer.json: missing key 'training_examples'"):
        judge_provenance(judge)
    (judge / "scorer.json").write_text("{not json")
    with pytest.raises(DataError, match="judge/scorer.json: not valid JSON"):
        judge_provenance(judge)
    with pytest.raises(DataError, match="safety/scorer.json: task = 'safety', not the safety judge"):
        judge_provenance(safety)
    stats.write_text(json.dumps({"stage": 2, "corpora": [], "pool_corpora": [], "splits": {"train": {}}}))
    with pytest.raises(DataError, match="stats.json: not the stats of stage-1 groups"):
        stage1_provenance(stats)
    with pytest.raises(DataError, match="nowhere/stats.json: file not found .*mine --stage 1"):
        stage1_provenance(tmp_path / "nowhere" / "stats.json")
