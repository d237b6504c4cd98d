"""The RLOO estimator of ``chipo.train.rl`` against exact gradients on a tabular softmax policy.

Setup: one prompt, 6 responses, policy pi = softmax(theta), fixed pi_ref and reward vector r. The exact objective
J(theta) = sum_y pi r - beta sum_y pi_ref f(pi/pi_ref) (f from ``chipo.divergences``) is differentiated by autograd.
The estimator is the very function the trainer calls (``rloo_loss``); its *expected* gradient is computed exactly
by enumerating all 6^k ordered k-tuples of samples, each weighted by its probability prod_i pi(y_i):

    E[grad loss] = sum_{tuples} P(tuple) * grad loss(tuple)          (P(tuple) held fixed: it is the sampling law)

k1 (the f'-penalty, any f):  E[grad loss] = -grad J                   to 1e-10 (float64).
k3 (KL only, GRPO-style):     E[grad loss] = -grad E_pi[r] + beta grad KL(pi_ref || pi)   (the forward KL).
"""

import itertools

import pytest
import torch

from chipo.divergences import FORWARD_KL, get_divergence
from chipo.train.rl import exact_objective, rloo_advantages, rloo_loss

N_RESPONSES = 6


def _instance(seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(N_RESPONSES, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(N_RESPONSES, generator=g, dtype=torch.float64)
    rewards = torch.rand(N_RESPONSES, generator=g, dtype=torch.float64) * 2 - 0.5
    return theta, torch.log_softmax(ref_logits, -1), rewards


def _expected_surrogate_gradient(theta, ref_logps, rewards, k, **kwargs):
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    tuples = torch.tensor(list(itertools.product(range(N_RESPONSES), repeat=k)))  # [6^k, k]
    losses, _ = rloo_loss(logp[tuples], ref_logps[tuples], rewards[tuples], **kwargs)
    prob = logp[tuples].sum(-1).exp().detach()  # P(tuple): the law the samples are drawn from, not differentiated
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-12)
    (grad,) = torch.autograd.grad((prob * losses).sum(), theta)
    return grad


def _exact_gradient(theta, ref_logps, rewards, beta, divergence):
    theta = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(exact_objective(theta, ref_logps, rewards, beta, divergence), theta)
    return grad


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("regularizer", ["kl", "chi2", "chi2mix"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 2.0])
def test_k1_expected_gradient_is_exact(regularizer, k, beta):
    theta, ref_logps, rewards = _instance(seed=k)
    expected = _expected_surrogate_gradient(theta, ref_logps, rewards, k, beta=beta, divergence=regularizer)
    exact = _exact_gradient(theta, ref_logps, rewards, beta, regularizer)
    assert torch.allclose(expected, -exact, atol=1e-10, rtol=0), (expected, -exact)
    assert exact.abs().max() > 1e-3  # not a vacuous comparison


@pytest.mark.parametrize("k", [2, 3])
def test_k3_expected_gradient_is_forward_kl(k):
    """k3 in the loss: E[grad] = -grad E_pi[r] + beta * grad KL(pi_ref || pi) -- not the reverse KL it reports."""
    beta = 0.7
    theta, ref_logps, rewards = _instance(seed=10 + k)
    expected = _expected_surrogate_gradient(theta, ref_logps, rewards, k, beta=beta, divergence="kl", estimator="k3")

    theta_ = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta_, -1)
    forward_kl = (ref_logps.exp() * FORWARD_KL.f(logp - ref_logps)).sum()  # E_ref[-log z] = KL(pi_ref || pi)
    target = -(logp.exp() * rewards).sum() + beta * forward_kl
    (grad_target,) = torch.autograd.grad(target, theta_)
    assert torch.allclose(expected, grad_target, atol=1e-10, rtol=0)

    reverse = -_exact_gradient(theta, ref_logps, rewards, beta, "kl")
    assert (expected - reverse).abs().max() > 1e-3  # k3's gradient really differs from the reverse-KL one here


def test_k3_matches_k1_to_first_order_near_reference():
    """Near pi = pi_ref both KL gradients vanish to first order: grad KL(pi||ref) ~ grad KL(ref||pi) ~ 0."""
    theta, ref_logps, rewards = _instance(seed=3)
    theta = ref_logps + 1e-4 * theta  # pi within 1e-4 of pi_ref in logit space
    k1 = _expected_surrogate_gradient(theta, ref_logps, rewards, 2, beta=1.0, divergence="kl")
    k3 = _expected_surrogate_gradient(theta, ref_logps, rewards, 2, beta=1.0, divergence="kl", estimator="k3")
    assert torch.allclose(k1, k3, atol=1e-7)


def test_monte_carlo_gradient_converges():
    """A sampled estimate (the way the trainer uses it) agrees with the exact gradient within its noise."""
    torch.manual_seed(0)
    theta, ref_logps, rewards = _instance(seed=5)
    beta, k, prompts = 0.5, 4, 20000
    theta_ = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta_, -1)
    idx = torch.multinomial(logp.exp().detach(), prompts * k, replacement=True).view(prompts, k)
    losses, metrics = rloo_loss(logp[idx], ref_logps[idx], rewards[idx], beta=beta, divergence="chi2mix")
    (grad,) = torch.autograd.grad(losses.mean(), theta_)
    exact = -_exact_gradient(theta, ref_logps, rewards, beta, "chi2mix")
    assert torch.allclose(grad, exact, atol=0.02)
    # the reported divergence estimates are unbiased too: compare with exact values
    pi, ref = logp.exp().detach(), ref_logps.exp()
    kl = (pi * (logp.detach() - ref_logps)).sum()
    chi2 = 0.5 * ((pi / ref - 1) ** 2 * ref).sum()
    assert metrics["kl_k1"].mean().item() == pytest.approx(kl.item(), abs=0.02)
    assert metrics["kl_k3"].mean().item() == pytest.approx(kl.item(), abs=0.02)
    assert metrics["chi2"].mean().item() == pytest.approx(chi2.item(), rel=0.05)


def test_rloo_advantages_and_penalty_values():
    values = torch.tensor([[1.0, 2.0, 6.0]])
    assert torch.allclose(rloo_advantages(values), torch.tensor([[-3.0, -1.5, 4.5]]))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.ones(2, 1))
    # penalty beta * f'(z): at z = e, kl -> beta, chi2 -> beta (e - 1), chi2mix -> beta (e + 1); at z = 1: 0, 0, beta
    logp = torch.tensor([[0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    r = torch.zeros(1, 2, dtype=torch.float64)
    e = torch.e
    for name, at_e, at_1 in [("kl", 1.0, 0.0), ("chi2", e - 1, 0.0), ("chi2mix", e + 1, 1.0)]:
        _, metrics = rloo_loss(logp, ref, r, beta=2.0, divergence=name)
        assert metrics["penalty"].item() == pytest.approx(2.0 * (at_e + at_1) / 2)  # mean over the two samples
        assert metrics["penalized_reward"].item() == pytest.approx(-2.0 * (at_e + at_1) / 2)
    with pytest.raises(ValueError, match="k3 is a KL estimator"):
        rloo_loss(logp, ref, r, beta=1.0, divergence="chi2", estimator="k3")


def test_sequence_level_ratios_never_overflow():
    """log-ratios of thousands (long sequences) give finite losses and gradients thanks to the exp clamp."""
    logp = torch.tensor([[-10.0, -3000.0]], requires_grad=True)
    ref = torch.tensor([[-3000.0, -10.0]])
    losses, metrics = rloo_loss(logp, ref, torch.zeros(1, 2), beta=0.1, divergence=get_divergence("chi2mix"))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
