"""The re-ranker: combined scores, ranks within a context, the no-re-ranking switch, and the one entry
point `score_candidates` that generate and chat share, all by hand."""

import math

import numpy as np
import pytest

from pipeline.config import GenerateConfig
from pipeline.errors import ConfigError
from pipeline.rerank import combined_score, fluency_term, rank_within, rerank, safety_scores, score_candidates, term_weights


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


# --- the entry point ------------------------------------------------------------------------------


def test_an_empty_reply_keeps_its_safety_probabilities_but_has_no_prosociality():
    from conftest import FakeSafetyScorer

    scorer = FakeSafetyScorer()
    probs, prosociality = safety_scores(scorer, ["you are right", "", "  "], [["a"], ["b"], ["c"]])
    # 3 words: [1, 1.5, 1.5] / 4; no words: [1, 0, 0]
    assert probs == pytest.approx(np.array([[0.25, 0.375, 0.375], [1, 0, 0], [1, 0, 0]]))
    assert prosociality.tolist() == pytest.approx([0.25, 0.0, 0.0])
    assert scorer.calls[0][1] == [["a"], ["b"], ["c"]]  # replies are classified in their context


def test_alpha_beta_gamma_map_to_the_terms():
    assert term_weights(GenerateConfig(alpha=2.0, beta=0.5, gamma=0.0)) == {"fluency": 2.0, "prosociality": 0.5}
    assert term_weights(GenerateConfig(alpha=1.0, beta=1.0, gamma=0.25)) == \
        {"fluency": 1.0, "prosociality": 1.0, "agreement": 0.25}


class ConstantAgreement:
    """P(disagrees) 0.6 for every reply with a RoT."""

    def predict_proba(self, rots, responses, contexts=None):
        return np.tile([0.6, 0.1, 0.3], (len(rots), 1))


def test_score_candidates_combines_every_term_by_hand():
    from conftest import FakeSafetyScorer

    # one context, three candidates: per-token probabilities 0.5, 0.8 and 0 (no reply tokens)
    fluency = [math.log(0.5), math.log(0.8), -math.inf]
    rots, responses = ["be kind.", None, "it is wrong"], ["you are right", "no", ""]
    config = GenerateConfig(alpha=1.0, beta=2.0, gamma=0.5)
    scored = score_candidates(config, ["c"] * 3, [0, 1, 2], fluency, rots, responses, [["hi"]] * 3,
                              FakeSafetyScorer(), ConstantAgreement())
    assert scored.fluency_term.tolist() == pytest.approx([0.5, 0.8, 0.0])
    assert scored.prosociality.tolist() == pytest.approx([0.25, 0.5, 0.0])  # 1 / (1 + words); empty: 0
    assert scored.agreement.tolist() == pytest.approx([0.4, 0.4, 0.4])  # the one without a RoT: the mean
    # 0.5 + 0.5 + 0.2, 0.8 + 1.0 + 0.2, 0 + 0 + 0.2
    assert scored.verdict.score.tolist() == pytest.approx([1.2, 2.0, 0.2])
    assert scored.verdict.rank.tolist() == [2, 1, 3] and scored.verdict.selected.tolist() == [False, True, False]
    assert scored.safety_probs.shape == (3, 3)
    # gamma = 0: the agreement is still scored when a scorer is given, but weighs nothing
    two = score_candidates(GenerateConfig(alpha=1.0, beta=2.0, gamma=0.0), ["c"] * 3, [0, 1, 2], fluency, rots,
                           responses, [["hi"]] * 3, FakeSafetyScorer(), ConstantAgreement())
    assert two.verdict.score.tolist() == pytest.approx([1.0, 1.8, 0.0]) and two.agreement is not None
    with pytest.raises(ConfigError, match="generate.gamma = 0.5"):
        score_candidates(config, ["c"] * 3, [0, 1, 2], fluency, rots, responses, [["hi"]] * 3, FakeSafetyScorer())
