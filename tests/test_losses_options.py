"""Loss options and numerics: margins past exp's clamp, rewards relative to pi_ref, length-normalised IPO,
the RPO sft term (``sft_weight``) and the experimental per-response ``reward_bound``; hand-derived values."""

import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from chipo.divergences import DIVERGENCES
from chipo.losses import loss_names, preference_loss


def _ratios(lc, lr, dtype=torch.float64, grad=False):
    """Policy log-probs equal to the log-ratios L+ = lc, L- = lr, reference log-probs 0."""
    pc = torch.tensor(lc, dtype=dtype).requires_grad_(grad)
    pr = torch.tensor(lr, dtype=dtype).requires_grad_(grad)
    return pc, pr, torch.zeros_like(pc), torch.zeros_like(pr)


def _softplus(x):
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------ margins past the clamp
def test_chipo_margin_past_exp_clamp_keeps_its_sign():
    """L+ = 41, L- = 45 (fp32), beta = 0.05, r_max = 5. True margin 0.05 (e^41 + 41 - e^45 - 45) ~ -1.7e18, far
    below -2 r_max = -10: the clip binds, loss = -log sigmoid(-10) = softplus(10) = 10.0000454, gradient zero.
    Clamping each exponential at 40 instead gives 0.05 (41 - 45) = -0.2: loss 0.798, gradient nonzero."""
    pc, pr, rc, rr = _ratios([41.0], [45.0], dtype=torch.float32, grad=True)
    loss, m = preference_loss("chipo", pc, pr, rc, rr, beta=0.05, r_max=5.0)
    assert loss.item() == pytest.approx(_softplus(10.0), rel=1e-6)
    assert m["clipped"].item() == 1.0
    assert m["rewards/margins"].item() < -1e15 and m["rewards/accuracies"].item() == 0.0
    loss.sum().backward()
    assert pc.grad.item() == 0.0 and pr.grad.item() == 0.0


@pytest.mark.parametrize("link,lc,lr", [
    ("chi2", 41.0, 45.0),      # e^41 - e^45 < 0
    ("chi2mix", 45.0, 41.0),   # > 0
    ("fkl", -45.0, -41.0),     # -e^45 + e^41 < 0
    ("alpha", -90.0, -82.0),   # k = 1 - 0.5: (e^41 - e^45)/0.5 < 0
])
def test_exp_links_past_clamp_have_true_sign(link, lc, lr):
    """Every link with an exponential: log-ratios beyond the clamp (40) still give a margin of the true sign and
    a size far past any clip, which the chiPO clip (r_max = 5, band +-10) turns into loss softplus(-+10)."""
    sign = 1.0 if lc > lr else -1.0  # every link is increasing
    loss, m = preference_loss("chipo", *_ratios([lc], [lr], dtype=torch.float32), beta=0.1, link=link)
    assert m["rewards/margins"].item() * sign > 1e15
    assert loss.item() == pytest.approx(_softplus(-10.0 * sign), rel=1e-6)


@settings(max_examples=60)
@given(st.floats(-200, 200), st.floats(-200, 200))
@example(0.0, 1.4e-45)  # a subnormal log-ratio: the true margin 0.1 * -2.8e-45 is below fp32's range
@example(-1e-40, 1e-40)
def test_property_chipo_margin_sign_is_exact(lc, lr):
    """chiPO's link phi(L) = e^L + L is increasing with phi'(L) = e^L + 1 > 1, so the margin
    beta (phi(L+) - phi(L-)) has the sign of L+ - L- and |margin| > beta |L+ - L-|, at any size, in fp32 too.

    fp32 cannot represent every such margin: for L+ = 0, L- = 1.4e-45 (the smallest subnormal) the true margin
    0.1 * (1 - e^1.4e-45 - 1.4e-45) ~ -2.8e-46 is below the smallest subnormal 1.4e-45 and rounds to -0.0, which
    keeps its sign. So: the sign (of a signed zero too) is always exact, and the margin is nonzero whenever
    beta |L+ - L-| is at least fp32's smallest normal number (1.18e-38), where rounding cannot reach zero."""
    a, b = torch.tensor([lc], dtype=torch.float32), torch.tensor([lr], dtype=torch.float32)
    assume(a.item() != b.item())
    beta = 0.1
    _, m = preference_loss("chipo", a, b, torch.zeros(1), torch.zeros(1), beta=beta, r_max=None)
    margin = m["rewards/margins"].item()
    assert math.copysign(1.0, margin) == math.copysign(1.0, a.item() - b.item())
    if beta * abs(a.item() - b.item()) >= torch.finfo(torch.float32).tiny:
        assert margin != 0.0


# --------------------------------------------------------------------------------------------- logged rewards
@pytest.mark.parametrize("name", loss_names())
@pytest.mark.parametrize("link", sorted(DIVERGENCES))
def test_rewards_start_at_zero_margins_unchanged(name, link):
    """At pi = pi_ref (L = 0) every link's logged reward beta (link(1) - link(1)) is 0 (TRL logs beta L, also 0);
    at L+ = 0.3, L- = -0.2 the margin is the plain link difference beta (link(z+) - link(z-))."""
    lengths = {"chosen_lengths": torch.ones(1), "rejected_lengths": torch.ones(1)}
    _, m0 = preference_loss(name, *_ratios([0.0], [0.0]), beta=0.2, link=link, **lengths)
    assert m0["rewards/chosen"].item() == 0.0 and m0["rewards/rejected"].item() == 0.0
    _, m = preference_loss(name, *_ratios([0.3], [-0.2]), beta=0.2, link=link, **lengths)
    div = DIVERGENCES[link]()
    L = torch.tensor([0.3, -0.2, 0.0], dtype=torch.float64)
    value = div.link(L)
    assert m["rewards/margins"].item() == pytest.approx(0.2 * (value[0] - value[1]).item(), abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(0.2 * (value[0] - value[2]).item(), abs=1e-12)


# ------------------------------------------------------------------------------------------- length normalisation
def test_ipo_length_normalised_hand_value():
    """TRL's IPO: h = L+/n+ - L-/n- with L+ = 3 over 3 tokens, L- = -2 over 4: h = 1 + 0.5 = 1.5; beta = 0.5:
    loss (h - 1/(2 beta))^2 = (1.5 - 1)^2 = 0.25. Summed form (length_normalize=False): (5 - 1)^2 = 16."""
    lengths = {"chosen_lengths": torch.tensor([3]), "rejected_lengths": torch.tensor([4])}
    loss, m = preference_loss("ipo", *_ratios([3.0], [-2.0]), beta=0.5, **lengths)
    assert loss.item() == pytest.approx(0.25, abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(0.75, abs=1e-12)
    assert m["logratio/chosen"].item() == 3.0  # logged log-ratios stay summed (the distribution-shift signal)
    summed, _ = preference_loss("ipo", *_ratios([3.0], [-2.0]), beta=0.5, length_normalize=False, **lengths)
    assert summed.item() == pytest.approx(16.0, abs=1e-12)


def test_length_normalize_as_an_option_of_any_preset():
    """DPO with averaged log-probs: margin beta (L+/n+ - L-/n-) = 0.1 (2/4 - (-1)/2) = 0.1."""
    lengths = {"chosen_lengths": torch.tensor([4]), "rejected_lengths": torch.tensor([2])}
    _, m = preference_loss("dpo", *_ratios([2.0], [-1.0]), beta=0.1, length_normalize=True, **lengths)
    assert m["rewards/margins"].item() == pytest.approx(0.1, abs=1e-12)


def test_lengths_required_and_checked():
    with pytest.raises(ValueError, match="length_normalize .on by default for ipo. needs chosen_lengths"):
        preference_loss("ipo", *_ratios([1.0], [0.0]), beta=0.1)
    with pytest.raises(ValueError, match="rejected_lengths has shape"):
        preference_loss("ipo", *_ratios([1.0], [0.0]), beta=0.1, chosen_lengths=torch.ones(1),
                        rejected_lengths=torch.ones(2))


# ------------------------------------------------------------------------------------------------- sft_weight (RPO)
@pytest.mark.parametrize("name", loss_names())
def test_sft_weight_adds_token_mean_nll_of_chosen(name):
    """Chosen log-probs -6 (3 tokens) and -2 (1 token): TRL's sft term is (6 + 2)/(3 + 1) = 2; chipo's per-pair
    terms are -logp * B / tokens = 6 * 2/4 = 3 and 2 * 2/4 = 1 (mean 2). d term_i / d logp_i = -B/tokens = -0.5,
    so with sft_weight w = 0.7 the chosen gradient of the summed loss moves by -0.35 per pair."""
    lengths = {"chosen_lengths": torch.tensor([3, 1]), "rejected_lengths": torch.tensor([2, 2])}
    pc, pr, rc, rr = _ratios([-6.0, -2.0], [-5.0, -1.0], grad=True)
    rc, rr = rc - 5.5, rr - 2.5  # log-ratios 0.5 and -2.5 / -2.5 and 1.5
    base, _ = preference_loss(name, pc, pr, rc, rr, beta=0.2, **lengths)
    (base_grad,) = torch.autograd.grad(base.sum(), pc)
    loss, _ = preference_loss(name, pc, pr, rc, rr, beta=0.2, sft_weight=0.7, **lengths)
    (grad,) = torch.autograd.grad(loss.sum(), pc)
    torch.testing.assert_close(loss - base, 0.7 * torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert (loss - base).mean().item() == pytest.approx(0.7 * 2.0, abs=1e-12)
    torch.testing.assert_close(grad - base_grad, torch.full((2,), -0.35, dtype=torch.float64))


def test_sft_weight_needs_chosen_lengths():
    with pytest.raises(ValueError, match="sft_weight needs chosen_lengths"):
        preference_loss("dpo", *_ratios([1.0], [0.0]), beta=0.1, sft_weight=1.0)


# ------------------------------------------------------------------------------------------------- reward_bound
def test_reward_bound_brakes_the_push_down_side():
    """DPO, beta = 1, L+ = 0.5, L- = -3, reward_bound = 1: r+ = 0.5 (inside), r- = -3 -> -1 (bounded, no gradient).
    Effective margin 0.5 - (-1) = 1.5, loss softplus(-1.5) = 0.201413; d/dL+ = -sigmoid(-1.5) = -0.182426,
    d/dL- = 0 (without the bound it would be +sigmoid(-3.5) = 0.029312). The logged margin stays 3.5."""
    pc, pr, rc, rr = _ratios([0.5], [-3.0], grad=True)
    loss, m = preference_loss("dpo", pc, pr, rc, rr, beta=1.0, reward_bound=1.0)
    assert loss.item() == pytest.approx(_softplus(-1.5), abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(3.5) and m["clipped"].item() == 0.0
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-1.0 / (1.0 + math.exp(1.5)), abs=1e-12)
    assert pr.grad.item() == 0.0


def test_reward_bound_chipo_link_and_both_bounded():
    """chiPO, beta = 0.5, L+ = log 2, L- = 0: r+ = 0.5 (2 + log 2 - 1) = 0.846574, bound 0.5 -> 0.5; r- = 0.
    Margin 0.5, loss softplus(-0.5) = 0.474077. No gradient on L+ (bounded); L- is inside the bound and keeps
    d loss/dL- = sigmoid(-0.5) * beta (e^0 + 1) = 0.377541. With L+ = 2, L- = -3 both rewards are past the bound
    (r+ = 0.5 (e^2 + 1) = 4.19, r- = 0.5 (e^-3 - 4) = -1.98): margin 0.5 - (-0.5) = 1, clipped = 1, no gradient."""
    pc, pr, rc, rr = _ratios([math.log(2.0)], [0.0], grad=True)
    loss, m = preference_loss("chipo", pc, pr, rc, rr, beta=0.5, reward_bound=0.5)
    assert loss.item() == pytest.approx(_softplus(-0.5), abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (1 + math.log(2.0)), abs=1e-12)
    loss.sum().backward()
    assert pc.grad.item() == 0.0
    assert pr.grad.item() == pytest.approx(1.0 / (1.0 + math.exp(0.5)), abs=1e-12)
    pc, pr, rc, rr = _ratios([2.0], [-3.0], grad=True)
    loss, m = preference_loss("chipo", pc, pr, rc, rr, beta=0.5, reward_bound=0.5)
    assert m["clipped"].item() == 1.0 and loss.item() == pytest.approx(_softplus(-1.0), abs=1e-12)
    loss.sum().backward()
    assert pc.grad.item() == 0.0 and pr.grad.item() == 0.0


@pytest.mark.parametrize("option,value,needle", [
    ("sft_weight", -1.0, "sft_weight must be a finite number >= 0"),
    ("sft_weight", math.nan, "sft_weight must be a finite number >= 0"),
    ("reward_bound", 0.0, "reward_bound must be positive"),
    ("length_normalize", "yes", "length_normalize must be true or false"),
])
def test_option_errors(option, value, needle):
    with pytest.raises(ValueError, match=needle):
        preference_loss("dpo", *_ratios([1.0], [0.0]), beta=0.1, **{option: value})
