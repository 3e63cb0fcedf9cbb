"""The re-ranker: combined scores, ranks within a context and the no-re-ranking switch, by hand."""

import math

import numpy as np
import pytest

from pipeline.rerank import combined_score, fluency_term, rank_within, rerank


def test_fluency_term_is_the_per_token_probability():
    # mean log-prob log(0.5) -> 0.5; log(1) -> 1; a target the model calls impossible -> 0
    assert fluency_term([math.log(0.5), 0.0, -math.inf]).tolist() == pytest.approx([0.5, 1.0, 0.0])


# Two contexts, interleaved on purpose. Context a: per-token probabilities 0.5, 0.25, 0.8 and
# P(casual) 0.9, 0.2, 0.1. Context b: two candidates with equal scores, listed out of sampling order.
GROUPS = ["a", "b", "a", "b", "a"]
INDEX = [0, 1, 1, 0, 2]
FLUENCY = np.array([0.5, 0.5, 0.25, 0.5, 0.8])
PROSOCIAL = np.array([0.9, 0.3, 0.2, 0.3, 0.1])


def test_equal_weights_add_the_terms_and_rank_the_best_first():
    result = rerank(GROUPS, INDEX, {"fluency": FLUENCY, "prosociality": PROSOCIAL}, {"fluency": 1, "prosociality": 1})
    # a: 0.5+0.9 = 1.4, 0.25+0.2 = 0.45, 0.8+0.1 = 0.9 -> ranks 1, 3, 2; b: 0.8 and 0.8, a tie
    assert result.score.tolist() == pytest.approx([1.4, 0.8, 0.45, 0.8, 0.9])
    # the tie in b goes to the earlier sample: candidate_index 0 (row 3) ranks 1
    assert result.rank.tolist() == [1, 2, 3, 1, 2]
    assert result.selected.tolist() == [True, False, False, True, False]


def test_weights_change_the_winner():
    result = rerank(GROUPS, INDEX, {"fluency": FLUENCY, "prosociality": PROSOCIAL},
                    {"fluency": 2.0, "prosociality": 0.5})
    # a: 1.0+0.45 = 1.45, 0.5+0.1 = 0.6, 1.6+0.05 = 1.65 -> the most fluent one wins now
    assert result.score[[0, 2, 4]].tolist() == pytest.approx([1.45, 0.6, 1.65])
    assert result.rank[[0, 2, 4]].tolist() == [2, 3, 1]


def test_prosociality_alone_picks_the_safest():
    result = rerank(GROUPS, INDEX, {"fluency": FLUENCY, "prosociality": PROSOCIAL}, {"fluency": 0, "prosociality": 1})
    assert result.rank[[0, 2, 4]].tolist() == [1, 2, 3]


def test_switched_off_the_first_sample_is_selected_and_ranks_follow_sampling_order():
    result = rerank(GROUPS, INDEX, {"fluency": FLUENCY, "prosociality": PROSOCIAL},
                    {"fluency": 1, "prosociality": 1}, enabled=False)
    assert result.rank.tolist() == [1, 2, 2, 1, 3]  # candidate_index + 1
    assert result.selected.tolist() == [True, False, False, True, False]
    assert result.score.tolist() == pytest.approx([1.4, 0.8, 0.45, 0.8, 0.9])  # still computed


def test_a_nan_score_ranks_last():
    score = np.array([np.nan, 0.1, 0.5])
    assert rank_within(["c", "c", "c"], score, [0, 1, 2]).tolist() == [3, 2, 1]


def test_a_third_term_with_weight_zero_changes_nothing():
    """Issue 8's `gamma * agreement` is one more entry in terms and weights."""
    two = rerank(GROUPS, INDEX, {"fluency": FLUENCY, "prosociality": PROSOCIAL}, {"fluency": 1, "prosociality": 1})
    agreement = np.array([0.0, 1.0, 1.0, 0.0, 0.5])
    three = rerank(GROUPS, INDEX, {"fluency": FLUENCY, "prosociality": PROSOCIAL, "agreement": agreement},
                   {"fluency": 1, "prosociality": 1, "agreement": 0.0})
    assert three.rank.tolist() == two.rank.tolist()
    # with gamma = 1, context a becomes 1.4, 1.45, 1.4: the second sample wins, the tie goes to index 0
    weighted = rerank(GROUPS, INDEX, {"fluency": FLUENCY, "prosociality": PROSOCIAL, "agreement": agreement},
                      {"fluency": 1, "prosociality": 1, "agreement": 1.0})
    assert weighted.rank[[0, 2, 4]].tolist() == [2, 1, 3]


def test_terms_and_weights_must_match():
    with pytest.raises(ValueError, match="same terms"):
        combined_score({"fluency": FLUENCY}, {"fluency": 1, "prosociality": 1})
    with pytest.raises(ValueError, match="same length"):
        combined_score({"fluency": FLUENCY, "prosociality": PROSOCIAL[:2]}, {"fluency": 1, "prosociality": 1})
