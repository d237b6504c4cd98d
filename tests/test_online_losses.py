"""The pure pieces of chipo online (chipo.losses.online): hand-derived values and exact expected gradients on a
tabular softmax policy, where every expectation is a finite sum."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chipo.divergences import get_divergence
from chipo.losses.online import mixture_logits, nash_md_loss, preference_probability, sample_labels, xpo_bonus


def test_xpo_bonus_values():
    """alpha (log pi(y~) - log pi_ref(y~)): alpha 0.5, log pi (-2, -3), log pi_ref (-1, -3) -> (-0.5, 0)."""
    out = xpo_bonus(torch.tensor([-2.0, -3.0]), torch.tensor([-1.0, -3.0]), 0.5)
    assert out.tolist() == pytest.approx([-0.5, 0.0])
    with pytest.raises(ValueError, match="alpha"):
        xpo_bonus(torch.zeros(1), torch.zeros(1), -1.0)


def test_xpo_bonus_expected_gradient_is_minus_alpha_grad_reverse_kl():
    """Over y~ ~ pi_ref the bonus's gradient is alpha sum_y pi_ref(y) grad log pi(y) = -alpha grad KL(pi_ref || pi)
    (KL(pi_ref || pi) = sum pi_ref log pi_ref - sum pi_ref log pi): minimising the loss with the bonus *raises*
    KL(pi_ref || pi), XPO's optimism (Xie et al. 2024, Alg. 1: + alpha log pi(y~) in the minimised objective)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    alpha = 0.3
    logp = torch.log_softmax(theta, -1)
    expected_surrogate = (ref.exp() * xpo_bonus(logp, ref, alpha)).sum()
    (grad,) = torch.autograd.grad(expected_surrogate, theta)
    kl_ref_pi = (ref.exp() * (ref - torch.log_softmax(theta, -1))).sum()
    (kl_grad,) = torch.autograd.grad(kl_ref_pi, theta)
    assert torch.allclose(grad, -alpha * kl_grad, atol=1e-12)
    assert grad.abs().max() > 1e-3  # not vacuous


def test_nash_md_loss_value():
    """p = 0.75, log pi = -2, log pi_ref = -2.5, beta 0.1, KL: f'(z) = L = 0.5;
    loss = -(p - 1/2) log pi + beta L log pi = -(0.25)(-2) + 0.1 * 0.5 * (-2) = 0.5 - 0.1 = 0.4.
    chi2mix: f'(z) = e^0.5 + 0.5 = 2.1487; loss = 0.5 + 0.1 * 2.1487 * (-2) = 0.07025."""
    args = torch.tensor([-2.0], dtype=torch.float64), torch.tensor([-2.5], dtype=torch.float64)
    p = torch.tensor([0.75], dtype=torch.float64)
    loss, metrics = nash_md_loss(*args, p, beta=0.1)
    assert loss.item() == pytest.approx(0.4)
    assert metrics["loss/score"].item() == pytest.approx(-0.5)
    assert metrics["loss/kl"].item() == pytest.approx(0.5)
    # per-sample k3 KL estimate (1/z - 1) + log z at L = 0.5
    assert metrics["kl"].item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    loss, _ = nash_md_loss(*args, p, beta=0.1, divergence="chi2mix")
    assert loss.item() == pytest.approx(0.5 - 0.2 * (math.exp(0.5) + 0.5))


@pytest.mark.parametrize("divergence", ["kl", "chi2mix", "chi2"])
def test_nash_md_expected_gradient_is_exact(divergence):
    """Nash-MD-PG (Munos et al. 2023): with y ~ pi, y' ~ pi^m (geometric mixture, held fixed) and any preference
    matrix P (P + P^T = 1), E[grad loss] = -grad[ sum_{y,y'} pi(y) pi^m(y') P(y, y') - beta D_f(pi || pi_ref) ],
    D_f = sum_y pi_ref f(pi/pi_ref). The expectation is the finite sum over (y, y') weighted by stopgrad(pi) pi^m."""
    g = torch.Generator().manual_seed(1)
    n, beta, m = 5, 0.2, 0.4
    theta = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(n, generator=g, dtype=torch.float64), -1)
    upper = torch.rand(n, n, generator=g, dtype=torch.float64)
    P = torch.triu(upper, 1) + torch.tril(1 - upper.T, -1) + 0.5 * torch.eye(n, dtype=torch.float64)
    assert torch.allclose(P + P.T, torch.ones(n, n, dtype=torch.float64))
    logp = torch.log_softmax(theta, -1)
    mix = torch.softmax(((1 - m) * logp + m * ref).detach(), -1)
    y, y2 = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    losses, _ = nash_md_loss(logp[y.flatten()], ref[y.flatten()], P[y.flatten(), y2.flatten()], beta=beta,
                             divergence=divergence)
    weights = (logp.exp().detach()[:, None] * mix[None, :]).flatten()
    (grad,) = torch.autograd.grad((weights * losses).sum(), theta)
    f = get_divergence(divergence)
    pi = torch.log_softmax(theta, -1).exp()
    objective = (pi[:, None] * mix[None, :] * P).sum() - beta * (ref.exp() * f.f(torch.log(pi) - ref)).sum()
    (exact,) = torch.autograd.grad(-objective, theta)
    assert torch.allclose(grad, exact, atol=1e-12)
    assert exact.abs().max() > 1e-3


def test_preference_probability_and_labels():
    """bt: sigmoid(r_a - r_b) = sigmoid(1) = 0.7311 for (2, 1); argmax: 1, 0, 1/2 for a better, worse, equal."""
    a, b = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 3.0, 1.0])
    assert preference_probability(a, b, "bt").tolist() == pytest.approx([1 / (1 + math.exp(-1)),
                                                                        1 / (1 + math.exp(3)), 0.5])
    assert preference_probability(a, b, "argmax").tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="label mode"):
        preference_probability(a, b, "max")
    p = torch.tensor([0.3, 0.3, 0.9])
    assert sample_labels(p, torch.tensor([0.29, 0.31, 0.95])).tolist() == [1.0, 0.0, 0.0]


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 10_000))
def test_mixture_logits_is_normalised_geometric_mixture(m, seed):
    """log_softmax((1-m) log p + m log q) = log(p^(1-m) q^m / sum_v p^(1-m) q^m), whatever the logits' offsets."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 7, generator=g, dtype=torch.float64) * 3
    out = mixture_logits(a + 5.0, b - 2.0, m).double()
    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    unnormalised = p ** (1 - m) * q**m
    assert torch.allclose(out.exp(), unnormalised / unnormalised.sum(), atol=1e-5)
    assert torch.allclose(mixture_logits(a, b, 0.0).double().exp(), p, atol=1e-6)
    assert torch.allclose(mixture_logits(a, b, 1.0).double().exp(), q, atol=1e-6)
