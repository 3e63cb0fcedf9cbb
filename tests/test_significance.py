"""The rules behind the reports' bold cells (pipeline/significance.py)."""

import pytest

from pipeline import significance as S


def diff(difference, ci, p=None, clusters=100):
    return {"difference": difference, "ci": ci, "p_value": p, "n": clusters, "n_clusters": clusters}


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 of three tests: 3 x 0.01, 2 x 0.02, 1 x 0.04 -> 0.03, 0.04, 0.04 (kept monotone)
    assert S.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # an untested cell (None) does not count among the tests
    assert S.holm([None, 0.02, 0.5]) == [None, pytest.approx(0.04), pytest.approx(0.5)]
    assert S.holm([0.9, 0.3]) == pytest.approx([0.9, 0.6])  # 2 x 0.3, then 1 x 0.9
    assert S.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert S.holm([]) == []


def test_the_p_value_from_an_interval_is_the_normal_approximation():
    # a difference 1.96 se from 0 has p = 0.05; the interval's half-width is 1.96 se
    assert S.interval_p_value(1.0, [0.0, 2.0]) == pytest.approx(0.05, abs=1e-6)
    assert S.interval_p_value(0.0, [-1.0, 1.0]) == pytest.approx(1.0)
    assert S.interval_p_value(0.2, [0.2, 0.2]) == 0.0 and S.interval_p_value(0.0, [0.0, 0.0]) == 1.0


def test_a_rate_takes_its_exact_p_and_other_metrics_theirs_from_the_interval():
    assert S.p_value(diff(-0.1, [-0.2, -0.01], p=0.07)) == (0.07, S.EXACT)
    p, method = S.p_value(diff(0.5, [0.0, 1.0]))
    assert method == S.FROM_INTERVAL and p == pytest.approx(0.05, abs=1e-3)
    assert S.p_value(diff(0.5, None)) == (None, None) and S.p_value(None) == (None, None)


def test_significant_needs_the_interval_the_test_and_holm():
    cells = [diff(-0.1, [-0.2, -0.01], p=0.001),   # all agree
             diff(-0.1, [-0.2, -0.01], p=0.07),    # the interval excludes 0, the exact test does not reject
             diff(0.1, [-0.05, 0.25], p=0.001),    # the test rejects, the interval holds 0
             None]
    marked = S.marks(cells)
    assert [m["significant"] for m in marked] == [True, False, False, False]
    assert marked[0]["p_holm"] == pytest.approx(0.003) and marked[3]["p"] is None
    # p = 0.02 passes alone, not as one of three tested cells (Holm: 3 x 0.02 = 0.06)
    alone = diff(0.1, [0.01, 0.19], p=0.02)
    assert S.marks([alone])[0]["significant"]
    assert not S.marks([alone, diff(0.0, [-1, 1], p=0.9), diff(0.0, [-1, 1], p=0.8)])[0]["significant"]


def test_fewer_than_30_clusters_get_no_interval_or_test():
    entry = diff(-0.24, [-0.4, -0.08], p=0.004, clusters=29)
    assert S.too_few(entry) and S.marks([entry])[0] == {"p": None, "method": None, "p_holm": None,
                                                        "significant": False}
    assert S.direction(entry) is None
    S.limit(entry)
    assert (entry["ci"], entry["p_value"], entry["too_few"]) == (None, None, 30)
    enough = diff(-0.24, [-0.4, -0.08], p=0.004, clusters=30)
    assert S.limit(dict(enough)) == enough and S.direction(enough) == "down"
    # clusters are the units where recorded, else the items
    assert S.too_few({"n": 500, "n_clusters": 12}) and not S.too_few({"n": 30})


def test_limit_all_reaches_every_nested_entry():
    tree = {"a": {"b": [diff(0.1, [0.0, 0.2], clusters=5)], "c": diff(0.1, [0.0, 0.2], clusters=50)},
            "value": {"value": 0.3, "ci": [0.1, 0.5], "n": 9}}
    S.limit_all(tree)
    assert tree["a"]["b"][0]["ci"] is None and tree["a"]["c"]["ci"] == [0.0, 0.2] and tree["value"]["ci"] is None


def test_direction_of_a_single_difference():
    assert S.direction(diff(0.1, [0.05, 0.15], p=0.01)) == "up"
    assert S.direction(diff(0.1, [0.05, 0.15], p=0.2)) == "same"  # the exact test does not agree
    assert S.direction(diff(0.1, [-0.05, 0.25])) == "same"
    assert S.direction(diff(0.1, None)) is None
