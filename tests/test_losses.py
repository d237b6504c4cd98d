"""Preference losses against hand-derived values, gradients, symmetries and extreme inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chipo.losses import LOSSES, loss_names, preference_loss


def _lengths(n):
    """Response lengths (needed by ipo's default length normalisation): 3 tokens per response."""
    return {"chosen_lengths": torch.full((n,), 3), "rejected_lengths": torch.full((n,), 3)}


def _ratios(lc, lr, dtype=torch.float64, grad=False):
    """Policy/ref log-probs with log-ratios L+ = lc, L- = lr (reference log-probs fixed at -5)."""
    pc = torch.tensor(lc, dtype=dtype) - 5.0
    pr = torch.tensor(lr, dtype=dtype) - 5.0
    if grad:
        pc.requires_grad_()
        pr.requires_grad_()
    ref = torch.full_like(pc, -5.0)
    return pc, pr, ref, ref.clone()


def test_dpo_hand_value():
    """L+ = 1, L- = -1, beta = 0.1: margin = 0.1 * (1 - (-1)) = 0.2, loss = log(1 + e^-0.2) = 0.598138869."""
    loss, m = preference_loss("dpo", *_ratios([1.0], [-1.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-12)
    assert loss.item() == pytest.approx(0.598138869, abs=1e-9)
    assert m["rewards/chosen"].item() == pytest.approx(0.1)
    assert m["rewards/margins"].item() == pytest.approx(0.2)


def test_chipo_hand_value():
    """z+ = 2 (L+ = log 2), z- = 1 (L- = 0), beta = 0.5, no clip binding (r_max = 5):
    phi(2) = 2 + log 2, phi(1) = 1, margin = 0.5 (1 + log 2) = 0.846573590, loss = log(1 + e^-margin).
    Logged rewards are beta (phi(z) - phi(1)), 0 at pi = pi_ref as in TRL: 0.5 (1 + log 2) and 0."""
    loss, m = preference_loss("chipo", *_ratios([math.log(2.0)], [0.0]), beta=0.5)
    margin = 0.5 * (1.0 + math.log(2.0))
    assert m["rewards/margins"].item() == pytest.approx(margin, abs=1e-12)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-margin)), abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (1 + math.log(2)), abs=1e-12)
    assert m["rewards/rejected"].item() == 0.0


def test_chipo_clip_value_and_zero_gradient():
    """beta = 1, L+ = 3, L- = 0, r_max = 1: margin = e^3 + 3 - 1 = 22.0855 > 2 r_max, so the margin is
    clipped to 2, loss = log(1 + e^-2) = 0.126928011, and the gradient is exactly zero (paper Alg. 1)."""
    pc, pr, rc, rr = _ratios([3.0], [0.0], grad=True)
    loss, m = preference_loss("chipo", pc, pr, rc, rr, beta=1.0, r_max=1.0)
    assert loss.item() == pytest.approx(0.126928011, abs=1e-9)
    assert m["clipped"].item() == 1.0
    assert m["rewards/margins"].item() == pytest.approx(math.exp(3) + 2, abs=1e-9)
    loss.sum().backward()
    assert pc.grad.item() == 0.0 and pr.grad.item() == 0.0


def test_chipo_gradient_weight():
    """d loss / d logp(y+) = -beta (z+ + 1) sigmoid(-margin) and d loss / d logp(y-) = +beta (z- + 1) sigmoid(-margin):
    chiPO's link phi = e^L + L has d phi/dL = z + 1, so it reweights DPO's gradient by z + 1."""
    beta, lc, lr = 0.3, 0.7, -0.4
    pc, pr, rc, rr = _ratios([lc], [lr], grad=True)
    loss, _ = preference_loss("chipo", pc, pr, rc, rr, beta=beta, r_max=None)
    loss.sum().backward()
    margin = beta * (math.exp(lc) + lc - math.exp(lr) - lr)
    sig = 1.0 / (1.0 + math.exp(margin))
    assert pc.grad.item() == pytest.approx(-beta * (math.exp(lc) + 1) * sig, abs=1e-12)
    assert pr.grad.item() == pytest.approx(beta * (math.exp(lr) + 1) * sig, abs=1e-12)


def test_ipo_hinge_robust_cdpo_hand_values():
    """h = L+ - L- = 2, beta = 0.5: summed IPO (h - 1/(2 beta))^2 = (2 - 1)^2 = 1; hinge max(0, 1 - beta h) = 0;
    with h = 0.4: hinge = 1 - 0.2 = 0.8. robust/cdpo with eps = 0.1 at margin m = 0.2:
    cdpo = 0.9 sp(-m) + 0.1 sp(m), robust = (0.9 sp(-m) - 0.1 sp(m)) / 0.8, sp = softplus."""
    ipo = preference_loss("ipo", *_ratios([1.0], [-1.0]), beta=0.5, length_normalize=False)[0]
    assert ipo.item() == pytest.approx(1.0)
    assert preference_loss("hinge", *_ratios([1.0], [-1.0]), beta=0.5)[0].item() == pytest.approx(0.0)
    assert preference_loss("hinge", *_ratios([0.2], [-0.2]), beta=0.5)[0].item() == pytest.approx(0.8)
    sp = lambda x: math.log1p(math.exp(x))
    cdpo = preference_loss("cdpo", *_ratios([1.0], [-1.0]), beta=0.1, label_smoothing=0.1)[0].item()
    robust = preference_loss("robust", *_ratios([1.0], [-1.0]), beta=0.1, label_smoothing=0.1)[0].item()
    assert cdpo == pytest.approx(0.9 * sp(-0.2) + 0.1 * sp(0.2), abs=1e-12)
    assert robust == pytest.approx((0.9 * sp(-0.2) - 0.1 * sp(0.2)) / 0.8, abs=1e-12)


@pytest.mark.parametrize("name,link", [
    ("fkl", lambda L: -math.exp(-L)),
    ("js", lambda L: math.log(2 * math.exp(L) / (1 + math.exp(L)))),
    ("alpha", lambda L: (math.exp(-0.5 * L) - 1) / -0.5),  # TRL's (z^(a-1) - 1)/(a - 1), a = 0.5
    ("chi2", lambda L: math.exp(L) - 1),
])
def test_f_divergence_links(name, link):
    """TRL's f-DPO links (forward KL -1/z, JS log(2z/(1+z)), alpha (z^(a-1) - 1)/(a-1)) and pure chi2 z - 1."""
    lc, lr, beta = 0.8, -0.3, 0.2
    loss, m = preference_loss(name, *_ratios([lc], [lr]), beta=beta)
    margin = beta * (link(lc) - link(lr))
    assert m["rewards/margins"].item() == pytest.approx(margin, abs=1e-12)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-margin)), abs=1e-12)


def test_links_and_pairwise_compose():
    """A chi-squared hinge loss: chiPO's link with SLiC's hinge, no new code."""
    lc, lr, beta = 0.5, 0.1, 0.2
    loss, _ = preference_loss("hinge", *_ratios([lc], [lr]), beta=beta, link="chi2mix")
    assert loss.item() == pytest.approx(1 - beta * (math.exp(lc) + lc - math.exp(lr) - lr), abs=1e-12)


@pytest.mark.parametrize("name", loss_names())
def test_gradcheck_float64(name):
    pc, pr, rc, rr = _ratios([0.3, -0.2, 1.1], [-0.5, 0.4, 0.9], grad=True)
    fn = lambda a, b: preference_loss(name, a, b, rc, rr, beta=0.4, **_lengths(3))[0]
    assert torch.autograd.gradcheck(fn, (pc, pr))


@pytest.mark.parametrize("name", loss_names())
def test_batched_equals_per_example_and_swap(name):
    lc, lr = [0.3, -0.2, 1.1, 0.0], [-0.5, 0.4, 0.9, 2.0]
    batched, bm = preference_loss(name, *_ratios(lc, lr), beta=0.2, **_lengths(4))
    single = torch.cat([preference_loss(name, *_ratios([a], [b]), beta=0.2, **_lengths(1))[0]
                        for a, b in zip(lc, lr)])
    torch.testing.assert_close(batched, single)
    _, sm = preference_loss(name, *_ratios(lr, lc), beta=0.2, **_lengths(4))
    torch.testing.assert_close(sm["rewards/margins"], -bm["rewards/margins"])
    if LOSSES[name].pairwise == "logistic" and not LOSSES[name].defaults.get("label_smoothing"):
        swapped, _ = preference_loss(name, *_ratios(lr, lc), beta=0.2, **_lengths(4))
        # logistic: loss(m) - loss(-m) = -m  (since log sigmoid(m) - log sigmoid(-m) = m)
        m = bm["rewards/margins"].clamp(-10.0, 10.0)
        torch.testing.assert_close(batched - swapped, -m)


@pytest.mark.parametrize("name", loss_names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4])
def test_extreme_inputs_finite(name, dtype, magnitude):
    """|L| up to 1e4 in fp32 and bf16: loss and gradients stay finite (exp's argument is clamped at 40)."""
    lc = [magnitude, -magnitude, magnitude, -magnitude, 0.0]
    lr = [-magnitude, magnitude, magnitude, 0.0, -magnitude]
    pc = (torch.tensor(lc) - 5.0).to(dtype).requires_grad_()
    pr = (torch.tensor(lr) - 5.0).to(dtype).requires_grad_()
    ref = torch.full((5,), -5.0, dtype=dtype)
    loss, metrics = preference_loss(name, pc, pr, ref, ref, beta=0.1, **_lengths(5))
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert torch.isfinite(pc.grad.float()).all() and torch.isfinite(pr.grad.float()).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_bf16_inputs_margin_computed_in_fp32():
    """bf16 log-probs -400 and -402 are exact in bf16 (spacing 2 there); L+ = 2, L- = -2, margin = 4 exactly,
    and the result is fp32 (a bf16 margin would round 400.5-size sums to a spacing of 2)."""
    pc = torch.tensor([-400.0], dtype=torch.bfloat16)
    rc = torch.tensor([-402.0], dtype=torch.bfloat16)
    _, m = preference_loss("dpo", pc, rc, rc, pc, beta=1.0)
    assert m["rewards/margins"].dtype == torch.float32
    assert m["rewards/margins"].item() == 4.0


def test_errors():
    args = _ratios([0.0], [0.0])
    with pytest.raises(ValueError, match="unknown loss 'nope'; valid: .*chipo.*dpo"):
        preference_loss("nope", *args, beta=0.1)
    with pytest.raises(ValueError, match="beta must be positive"):
        preference_loss("dpo", *args, beta=-0.1)
    with pytest.raises(ValueError, match="unknown loss option"):
        preference_loss("dpo", *args, beta=0.1, temperature=2)
    with pytest.raises(ValueError, match="r_max"):
        preference_loss("chipo", *args, beta=0.1, r_max=-1.0)


@settings(max_examples=60, deadline=None)
@given(st.floats(-30, 30), st.floats(-30, 30), st.floats(1e-3, 2.0))
def test_property_dpo_and_chipo_margins(lc, lr, beta):
    """DPO's margin is beta (L+ - L-); chiPO's is beta (e^L+ + L+ - e^L- - L-), increasing in L+."""
    _, dm = preference_loss("dpo", *_ratios([lc], [lr]), beta=beta)
    assert dm["rewards/margins"].item() == pytest.approx(beta * (lc - lr), rel=1e-9, abs=1e-9)
    _, cm = preference_loss("chipo", *_ratios([lc], [lr]), beta=beta, r_max=None)
    want = beta * (math.exp(lc) + lc - math.exp(lr) - lr)
    # _ratios rounds L through (L - 5) + 5: absolute error ~1e-15 times the size of the terms.
    scale = beta * (math.exp(lc) + math.exp(lr) + abs(lc) + abs(lr))
    assert cm["rewards/margins"].item() == pytest.approx(want, rel=1e-9, abs=1e-13 * scale)
    _, cm2 = preference_loss("chipo", *_ratios([lc + 0.1], [lr]), beta=beta, r_max=None)
    assert cm2["rewards/margins"].item() > cm["rewards/margins"].item()
