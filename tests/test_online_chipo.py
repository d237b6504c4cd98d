"""Online chiPO's mechanism, pinned with hand-derived values: what the margin clip does to a response the policy
samples far more often than pi_ref (z = pi/pi_ref huge), the per-sample penalty on the policy's own samples
(``chipo.losses.online.policy_penalty``), the SFT term over counted pairs only, and the chi-squared gradient
identity of ``chipo.losses.online``'s docstring."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chipo.divergences import CHI2, get_divergence
from chipo.losses import preference_loss
from chipo.losses.online import policy_penalty

BETA, R_MAX = 0.05, 5.0


def _pair(lc, lr, dtype=torch.float64):
    """Policy log-probs equal to the log-ratios L+ = lc, L- = lr (reference log-probs 0), differentiable."""
    pc = torch.tensor([lc], dtype=dtype, requires_grad=True)
    pr = torch.tensor([lr], dtype=dtype, requires_grad=True)
    return pc, pr, torch.zeros_like(pc), torch.zeros_like(pr)


def _grads(margin_clip, lc, lr, dtype=torch.float64):
    pc, pr, rc, rr = _pair(lc, lr, dtype)
    loss, metrics = preference_loss("chipo", pc, pr, rc, rr, beta=BETA, r_max=R_MAX, margin_clip=margin_clip)
    gc, gr = torch.autograd.grad(loss.sum(), (pc, pr))
    return loss.item(), gc.item(), gr.item(), metrics


def test_rejected_off_support_sample_gets_zero_gradient_under_the_paper_clip():
    """A rejected response the policy over-samples: L- = 35 (z- = e^35 = 1.59e15), chosen at pi_ref (L+ = 0).
    margin = beta (phi(1) - phi(z-)) = 0.05 (1 - e^35 - 35) = -7.9e13 < -2 r_max = -10: the two-sided clip
    (Huang et al. 2024, Alg. 1) binds, loss = softplus(10) = 10.0000454, and both gradients are exactly 0 --
    nothing lowers pi(y-)."""
    loss, gc, gr, m = _grads("both", 0.0, 35.0)
    assert loss == pytest.approx(math.log1p(math.exp(10.0)), rel=1e-12)
    assert gc == 0.0 and gr == 0.0 and m["clipped"].item() == 1.0


def test_rejected_off_support_sample_is_pushed_down_under_the_upper_clip():
    """Same pair, clip on the push-up side only: loss = softplus(-m), m = -7.9e13, so sigmoid(-m) = 1 and
    d loss / d log pi(y-) = sigmoid(-m) beta (z- + 1) = 0.05 (e^35 + 1) = 7.93e13 > 0 (descent lowers pi(y-));
    d loss / d log pi(y+) = -sigmoid(-m) beta (z+ + 1) = -0.05 * 2 = -0.1 (raises pi(y+))."""
    loss, gc, gr, m = _grads("upper", 0.0, 35.0)
    margin = BETA * (1.0 - math.exp(35.0) - 35.0)
    assert loss == pytest.approx(-margin, rel=1e-12)
    assert gr == pytest.approx(BETA * (math.exp(35.0) + 1.0), rel=1e-12)
    assert gc == pytest.approx(-0.1, rel=1e-12)
    assert m["clipped"].item() == 0.0


def test_upper_clip_still_pushes_down_past_the_exp_clamp_in_fp32():
    """L- = 1000 in fp32: z- = e^1000 is past exp's clamp (40), whose gradient is 0 there, but chiPO's link
    z + log z keeps its log part: d loss / d L- = sigmoid(-m) beta (0 + 1) = 0.05. Under the two-sided clip: 0."""
    _, _, gr, _ = _grads("upper", 0.0, 1000.0, torch.float32)
    assert gr == pytest.approx(BETA, rel=1e-6)
    assert _grads("both", 0.0, 1000.0, torch.float32)[2] == 0.0


def test_upper_clip_keeps_the_clip_on_the_push_up_side():
    """A chosen response with L+ = 35, rejected at pi_ref: margin = 0.05 (e^35 + 35 - 1) > 10, clipped under both
    modes: loss softplus(-10) = 4.54e-5, gradients 0 (a fitted pair does not pull further from pi_ref)."""
    for mode in ("both", "upper"):
        loss, gc, gr, m = _grads(mode, 35.0, 0.0)
        assert loss == pytest.approx(math.log1p(math.exp(-10.0)), rel=1e-9)
        assert gc == 0.0 and gr == 0.0 and m["clipped"].item() == 1.0


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.floats(-30, 30), st.floats(-30, 30))
def test_property_upper_clip_equals_both_inside_the_band_and_above(lc, lr):
    """The two modes differ only where the margin is below -2 r_max: there 'both' has zero gradient and 'upper'
    has the unclipped logistic loss's."""
    both, upper = _grads("both", lc, lr), _grads("upper", lc, lr)
    margin = BETA * (math.exp(lc) + lc - math.exp(lr) - lr)
    if margin >= -2 * R_MAX + 1e-9:
        assert upper[:3] == pytest.approx(both[:3], rel=1e-9, abs=1e-12)
    else:
        assert both[1] == 0.0 and both[2] == 0.0
        assert upper[2] > 0.0 and upper[1] < 0.0


def test_policy_penalty_value_and_gradient_on_an_off_support_sample():
    """chi2mix, beta 0.05, log pi(y) = -1, log pi_ref(y) = -36 (L = 35): the surrogate is
    beta (f'(z) - f'(1)) log pi = 0.05 (e^35 + 35 - 1) (-1) and its gradient in log pi(y) is
    0.05 (e^35 + 34) = 7.93e13 > 0: descent lowers pi(y) with chi-squared RLHF's per-sample penalty."""
    logp = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    out = policy_penalty(logp, torch.tensor([-36.0], dtype=torch.float64), beta=BETA, divergence="chi2mix")
    expected = BETA * (math.exp(35.0) + 34.0)
    assert out.item() == pytest.approx(-expected, rel=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), logp)
    assert grad.item() == pytest.approx(expected, rel=1e-12)
    zero = policy_penalty(torch.tensor([-2.0]), torch.tensor([-2.0]), beta=BETA, divergence="chi2mix")
    assert zero.item() == 0.0  # 0 at pi = pi_ref
    with pytest.raises(ValueError, match="beta"):
        policy_penalty(logp, logp, beta=-1.0, divergence="kl")


def test_bounded_policy_penalty_acts_only_above_the_reward_bound():
    """chi2mix, beta 0.05, bound R = 5. L = 35: weight relu(0.05 (e^35 + 35 - 1) - 5) = 0.05 (e^35 + 34) - 5
    = 7.93e13, so the gradient in log pi is that; L = 2: 0.05 (e^2 + 2 - 1) = 0.419 < 5, weight 0, no gradient."""
    logp = torch.tensor([-1.0, -1.0], dtype=torch.float64, requires_grad=True)
    out = policy_penalty(logp, torch.tensor([-36.0, -3.0], dtype=torch.float64), beta=BETA, divergence="chi2mix",
                         bound=5.0)
    (grad,) = torch.autograd.grad(out.sum(), logp)
    assert grad[0].item() == pytest.approx(BETA * (math.exp(35.0) + 34.0) - 5.0, rel=1e-12)
    assert grad[1].item() == 0.0 and out[1].item() == 0.0


def test_bounded_policy_penalty_expected_gradient_is_that_of_its_barrier():
    """chi2 link z - 1, beta 0.3, R = 0.2: weight relu(0.3 (z - 1) - 0.2) is Psi'(z) for the barrier
    Psi(z) = int_1^z relu(0.3 (t - 1) - 0.2) dt = 0.15 (z - z_R)^2 for z > z_R = 1 + 0.2/0.3, else 0. On a tabular
    policy, sum_y stopgrad(pi) grad surrogate(y) = grad sum_y pi_ref Psi(pi/pi_ref)."""
    g = torch.Generator().manual_seed(5)
    theta = (2 * torch.randn(6, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(theta, -1)
    surrogate = (logp.exp().detach() * policy_penalty(logp, ref, beta=0.3, divergence="chi2", bound=0.2)).sum()
    (grad,) = torch.autograd.grad(surrogate, theta)
    z = (torch.log_softmax(theta, -1) - ref).exp()
    z_bound = 1.0 + 0.2 / 0.3
    barrier = (ref.exp() * 0.15 * torch.clamp(z - z_bound, min=0.0) ** 2).sum()
    (exact,) = torch.autograd.grad(barrier, theta)
    assert (z.detach() > z_bound).any() and (z.detach() < z_bound).any()  # both sides of the bound occur
    assert torch.allclose(grad, exact, atol=1e-12) and exact.abs().max() > 1e-3


@pytest.mark.parametrize("divergence", ["kl", "chi2", "chi2mix"])
def test_policy_penalty_expected_gradient_is_beta_grad_divergence(divergence):
    """On a tabular softmax policy, E_{y ~ pi}[grad surrogate(y)] = sum_y stopgrad(pi(y)) grad surrogate(y)
    equals beta grad D_f(pi || pi_ref), D_f = sum_y pi_ref f(pi/pi_ref): grad z = z grad log pi gives
    grad D_f = sum_y pi f'(z) grad log pi, and the baseline f'(1) drops out since sum_y pi grad log pi = 0."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)
    beta = 0.3
    logp = torch.log_softmax(theta, -1)
    surrogate = (logp.exp().detach() * policy_penalty(logp, ref, beta=beta, divergence=divergence)).sum()
    (grad,) = torch.autograd.grad(surrogate, theta)
    f = get_divergence(divergence)
    (exact,) = torch.autograd.grad(beta * (ref.exp() * f.f(torch.log_softmax(theta, -1) - ref)).sum(), theta)
    assert torch.allclose(grad, exact, atol=1e-12)
    assert exact.abs().max() > 1e-3


def test_chi_squared_gradient_is_z_grad_log_pi_not_twice():
    """The docstring's identity: D_chi2 = (E_pi[z] - 1)/2 with E_pi[z] = sum_y pi^2 / pi_ref, so
    grad D_chi2 = (1/2) sum_y 2 pi grad pi / pi_ref = sum_y pi z grad log pi = E_pi[z grad log pi]
    (not 2 E_pi[z grad log pi]). Checked against autograd of D_chi2 = sum_y pi_ref (z - 1)^2 / 2."""
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(theta, -1)
    z = (logp - ref).exp()
    (score,) = torch.autograd.grad((logp.exp() * z).detach().mul(logp).sum(), theta)  # E_pi[z grad log pi]
    (exact,) = torch.autograd.grad((ref.exp() * CHI2.f(torch.log_softmax(theta, -1) - ref)).sum(), theta)
    half_sum = 0.5 * ((torch.log_softmax(theta, -1) - ref).exp() * torch.log_softmax(theta, -1).exp()).sum()
    (direct,) = torch.autograd.grad(half_sum, theta)
    assert torch.allclose(score, exact, atol=1e-12) and torch.allclose(direct, exact, atol=1e-12)
    assert not torch.allclose(2 * score, exact, atol=1e-3)


def test_sft_term_counts_only_counted_pairs():
    """Chosen log-probs -6 (3 tokens), -2 (1 token) and -4 (4 tokens, a dropped pair: mask False). The token total
    is 3 + 1 = 4, not 8: per-pair terms -logp * B / tokens = 6 * 3/4 = 4.5 and 2 * 3/4 = 1.5, the dropped pair 0;
    their mean over the B = 3 pairs is (6 + 2)/4 = 2, the token-mean NLL of the counted chosen responses (with the
    dropped pair's tokens in the total it was 1: sft_weight halved). The dropped pair gets no gradient."""
    lengths = {"chosen_lengths": torch.tensor([3, 1, 4]), "rejected_lengths": torch.tensor([2, 2, 2])}
    pc = torch.tensor([-6.0, -2.0, -4.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-5.0, -1.0, -3.0], dtype=torch.float64, requires_grad=True)
    rc, rr = torch.full((3,), -5.5, dtype=torch.float64), torch.full((3,), -2.5, dtype=torch.float64)
    mask = torch.tensor([True, True, False])
    base, _ = preference_loss("dpo", pc, pr, rc, rr, beta=0.2, mask=mask, **lengths)
    loss, _ = preference_loss("dpo", pc, pr, rc, rr, beta=0.2, mask=mask, sft_weight=1.0, **lengths)
    torch.testing.assert_close(loss - base, torch.tensor([4.5, 1.5, 0.0], dtype=torch.float64))
    assert (loss - base).mean().item() == pytest.approx(2.0, abs=1e-12)
    gc, gr = torch.autograd.grad(loss.sum(), (pc, pr))
    assert gc[2].item() == 0.0 and gr[2].item() == 0.0 and base[2].item() == 0.0
    unmasked, _ = preference_loss("dpo", pc, pr, rc, rr, beta=0.2, **lengths)
    torch.testing.assert_close(base[:2], unmasked[:2])  # the mask changes nothing for the counted pairs


# ------------------------------------------------------------------------------------------------- chipo online
def _config(**keys):
    from chipo.train.online_config import OnlineConfig

    return OnlineConfig(policy="p", prompts="x.jsonl", judge="m:f", output_dir="unused", **keys)


def test_default_penalty_options():
    """loss=chipo: weight 1, chiPO's link, bounded at the clip's r_max (5 by default, or the one given); no clip
    (clip_margin=false): unbounded; dpo, nash-md: off unless asked for."""
    assert _config(loss="chipo", beta=0.05).penalty_options() == {"beta": 0.05, "divergence": "chi2mix", "bound": 5.0}
    assert _config(loss="chipo", beta=0.1, r_max=2.0, policy_penalty=0.5).penalty_options() == {
        "beta": 0.05, "divergence": "chi2mix", "bound": 2.0}
    assert _config(loss="chipo", beta=0.05, clip_margin=False).penalty_options()["bound"] is None
    assert _config(loss="chipo", beta=0.05, policy_penalty=0.0).penalty_options() is None
    assert _config(loss="dpo", beta=0.05).penalty_options() is None
    assert _config(loss="dpo", beta=0.05, policy_penalty=1.0).penalty_options() == {
        "beta": 0.05, "divergence": "kl", "bound": None}
    assert _config(loss="nash-md", beta=0.05).penalty_options() is None


def _online_pair_gradient(config, lc, lr):
    """d loss / d log pi of (chosen, rejected) for one pair of policy samples, composed as chipo online does:
    the pairwise loss on the labelled pair plus the penalty on both samples, averaged over the prompt's two."""
    pc, pr, rc, rr = _pair(lc, lr)
    pair, _ = preference_loss(config.loss, pc, pr, rc, rr, beta=config.beta, **config.loss_options())
    loss = pair.sum()
    options = config.penalty_options()
    if options:
        loss = loss + policy_penalty(torch.stack([pc, pr]), torch.stack([rc, rr]), **options).mean()
    return [g.item() for g in torch.autograd.grad(loss, (pc, pr))]


def test_off_support_sample_is_lowered_under_the_new_default_and_was_not_under_the_old():
    """The policy's own rejected sample with L- = 35 (z- = e^35), chosen at pi_ref, beta 0.05, r_max 5 (the lab's).
    Old default (the paper's clip, no penalty): the margin -7.9e13 is past -10, gradient exactly 0 for both.
    New default: the clipped pair still gives 0, but the bounded penalty on the two samples (mean of 2) gives
    d/dL- = (0.05 (e^35 + 35 - 1) - 5) / 2 = 3.96e13 > 0 (descent lowers pi(y-)) and d/dL+ = 0 (z+ = 1 is inside
    the bound: relu(0 - 5) = 0)."""
    old = _config(loss="chipo", beta=BETA, r_max=R_MAX, policy_penalty=0.0)
    assert _online_pair_gradient(old, 0.0, 35.0) == [0.0, 0.0]
    new = _config(loss="chipo", beta=BETA, r_max=R_MAX)
    gc, gr = _online_pair_gradient(new, 0.0, 35.0)
    assert gc == 0.0 and gr == pytest.approx((BETA * (math.exp(35.0) + 34.0) - R_MAX) / 2, rel=1e-12)


def length_reward(prompts, responses):
    """A module:function judge: longer responses are better (0.1 per character)."""
    return [0.1 * len(r) for r in responses]


def _online(tiny_dir, tmp_path, *extra):
    from chipo.cli.main import main
    from chipo.io import write_jsonl

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("the cat sat", "a dog is", "why", "how")])
    base = [f"policy={tiny_dir / 'model'}", f"prompts={tmp_path / 'prompts.jsonl'}", "max_new_tokens=6",
            "prompts_per_step=4", "max_steps=2", "learning_rate=1e-3", "disable_tqdm=true", "save_steps=0",
            f"output_dir={tmp_path / 'run'}", "judge=test_online_chipo:length_reward"]
    return main(["online", *base, *extra])


@pytest.mark.parametrize("extra", [("loss=chipo", "policy_penalty=1.0"),
                                   ("loss=chipo", "exploration=xpo", "xpo_alpha=0.1", "policy_penalty=0.5")])
def test_chipo_online_with_the_policy_penalty(tiny_dir, tmp_path, extra):
    """The penalty is logged per step; at step 1 pi = pi_ref, so f'(z) - f'(1) = 0 and the penalty is 0."""
    from chipo.io import read_jsonl

    assert _online(tiny_dir, tmp_path, *extra) == 0
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss/penalty"] == pytest.approx(0.0, abs=1e-5) and math.isfinite(rows[1]["loss/penalty"])


@pytest.mark.parametrize("extra, message", [
    (("margin_clip=lower",), "margin_clip must be one of both, upper"),
    (("policy_penalty=-1",), "policy_penalty must be a finite number >= 0"),
    (("loss=nash-md", "policy_penalty=1"), "policy_penalty applies to pairwise losses"),
    (("loss=dpo", "policy_penalty=1", "policy_penalty_bound=true"), "policy_penalty_bound needs a reward bound"),
])
def test_bad_online_penalty_or_clip_is_one_line(tiny_dir, tmp_path, capsys, extra, message):
    assert _online(tiny_dir, tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chipo: error:") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()
