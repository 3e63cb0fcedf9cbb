"""The loss functions against hand-computed values and an independent implementation."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import cross_entropy, npair_loss, sequence_scores, severity_margins, total_loss


def test_npair_two_negative_case_by_hand():
    # Group 1: s+ = -1, s- = (-2, -1), severity (0.5, 0), margin 1, tau 0.5
    #   m = (0.5, 0); z_1 = (-2 - (-1) + 0.5) / 0.5 = -1;  z_2 = (-1 - (-1) + 0) / 0.5 = 0
    #   loss_1 = log(1 + e^-1 + e^0) = log(2 + e^-1) = log(2.367879...) = 0.861995...
    # Group 2: s+ = 0, s- = (0, 0), severity (0, 0): z = (0, 0), loss_2 = log(1 + 1 + 1) = log 3 = 1.098612...
    # Mean over the two groups: (0.861995 + 1.098612) / 2 = 0.980304...
    positive = torch.tensor([-1.0, 0.0])
    negative = torch.tensor([[-2.0, -1.0], [0.0, 0.0]])
    margins = severity_margins(torch.tensor([[0.5, 0.0], [0.0, 0.0]]), margin=1.0)
    assert margins.tolist() == [[0.5, 0.0], [0.0, 0.0]]
    loss, _ = npair_loss(positive, negative, margins, tau=0.5)
    assert loss.item() == pytest.approx((math.log(2 + math.exp(-1)) + math.log(3)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.980304, abs=1e-6)


def test_npair_equals_cross_entropy_over_scaled_scores_without_margins():
    generator = torch.Generator().manual_seed(0)
    positive = -torch.rand(8, generator=generator) * 5  # (G,)
    negative = -torch.rand(8, 3, generator=generator) * 5  # (G, N)
    for tau in (0.1, 1.0, 2.5):
        loss, _ = npair_loss(positive, negative, torch.zeros(8, 3), tau)
        logits = torch.cat([positive.unsqueeze(1), negative], dim=1) / tau  # (G, 1 + N)
        expected = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
        assert torch.allclose(loss, expected, atol=1e-6)


def test_better_ranked_positive_gives_lower_loss():
    negative, margins = torch.tensor([[-2.0, -3.0]]), torch.zeros(1, 2)
    losses = [npair_loss(torch.tensor([s]), negative, margins, 1.0)[0].item() for s in (-4.0, -2.5, -1.0)]
    assert losses[0] > losses[1] > losses[2]


def test_margins_raise_the_loss_and_grow_with_severity():
    positive, negative = torch.tensor([-1.0]), torch.tensor([[-2.0, -2.5]])
    losses = [npair_loss(positive, negative, severity_margins(torch.tensor([[s, s]]), 0.5), 1.0)[0].item()
              for s in (0.0, 0.5, 1.0)]
    assert losses[0] < losses[1] < losses[2]
    assert severity_margins(torch.tensor([[0.3, 1.0]]), 0.0).tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_tau_must_be_positive(tau):
    with pytest.raises(ValueError, match="tau"):
        npair_loss(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), tau)


def test_negative_margin_is_refused():
    with pytest.raises(ValueError, match="margin"):
        severity_margins(torch.ones(1, 2), -0.1)


def test_diagnostics_are_detached_and_right():
    positive = torch.tensor([-1.0, -3.0], requires_grad=True)
    negative = torch.tensor([[-2.0, -4.0], [-2.0, -5.0]], requires_grad=True)
    loss, diagnostics = npair_loss(positive, negative, torch.zeros(2, 2), 1.0)
    assert loss.requires_grad
    assert all(not value.requires_grad for value in diagnostics.values())
    assert diagnostics["positive_score"].item() == pytest.approx(-2.0)  # (-1 - 3) / 2
    assert diagnostics["negative_score"].item() == pytest.approx(-3.25)  # (-2 - 4 - 2 - 5) / 4
    assert diagnostics["score_gap"].item() == pytest.approx(1.25)
    # Group 1's positive (-1) beats -2 and -4; group 2's (-3) loses to -2.
    assert diagnostics["ranking_accuracy"].item() == pytest.approx(0.5)


def test_gradient_raises_the_positive_and_lowers_the_negatives():
    positive = torch.tensor([-1.0], requires_grad=True)
    negative = torch.tensor([[-1.5, -2.0]], requires_grad=True)
    loss, _ = npair_loss(positive, negative, torch.zeros(1, 2), 1.0)
    loss.backward()
    assert positive.grad.item() < 0
    assert (negative.grad > 0).all()
    # d loss / d s+ = -(sum of the softmax weights of the negatives), the negatives' weights sum to it.
    assert positive.grad.item() == pytest.approx(-negative.grad.sum().item())


def test_large_scores_stay_finite():
    positive = torch.tensor([-1e4, 0.0], requires_grad=True)
    negative = torch.tensor([[0.0, -1e4], [-1e4, -2e4]], requires_grad=True)
    loss, _ = npair_loss(positive, negative, torch.ones(2, 2), tau=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(positive.grad).all() and torch.isfinite(negative.grad).all()
    # Group 1: z = ((0 + 1e4 + 1) / 0.01, (-1e4 + 1e4 + 1) / 0.01) = (1000100, 100); log(1 + e^z1 + e^z2) = z1.
    # Group 2: every z is hugely negative, so its loss is 0. Mean: 1000100 / 2.
    assert loss.item() == pytest.approx(500050.0, rel=1e-6)


def test_sequence_scores_mean_or_sum_of_real_tokens_only():
    logps = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, 0.0, 0.0]])  # (B, T)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sequence_scores(logps, mask).tolist() == [-2.0, -2.0]  # (-1 - 3) / 2, -2 / 1
    assert sequence_scores(logps, mask, length_normalized=False).tolist() == [-4.0, -2.0]
    garbage = logps.clone()
    garbage[mask == 0] = -123.0  # what sits in padded positions must not matter
    assert sequence_scores(garbage, mask).tolist() == [-2.0, -2.0]
    assert sequence_scores(garbage, mask, length_normalized=False).tolist() == [-4.0, -2.0]


def test_cross_entropy_is_mean_nll_per_real_token():
    logps = torch.tensor([[-1.0, -3.0, -50.0], [-2.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert cross_entropy(logps, mask).item() == pytest.approx(2.0)  # (1 + 3 + 2) / 3 tokens


def test_total_loss_and_the_ce_only_ablation():
    ce, npair = torch.tensor(2.0), torch.tensor(0.5)
    assert total_loss(ce, npair, 0.4).item() == pytest.approx(2.2)
    assert total_loss(ce, npair, 0.0).item() == 2.0
    assert total_loss(ce, torch.tensor(float("inf")), 0.0).item() == 2.0  # lambda 0 ignores the term entirely
