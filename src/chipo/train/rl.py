"""Online RL with a choice of f-divergence regulariser: the RLOO estimator and the ``chipo rl`` trainer.

Objective (per prompt x; the expectation over prompts is implicit)::

    J(theta) = E_{y ~ pi_theta}[ r(x, y) ]  -  beta * D_f(pi_theta || pi_ref),
    D_f(pi || pi_ref) = E_{y ~ pi_ref}[ f(z(y)) ],   z(y) = pi_theta(y|x) / pi_ref(y|x)  (whole-sequence ratio).

Gradient (field notes, section 1: "the per-sample penalty is beta * f'(pi/pi_ref)"). Since z = pi / pi_ref,
grad z = z * grad log pi, hence::

    grad D_f = sum_y pi_ref(y) f'(z(y)) grad z(y) = sum_y pi(y) f'(z(y)) grad log pi(y) = E_pi[ f'(z) grad log pi ],
    grad E_pi[r] = E_pi[ r grad log pi ]                               (score function / REINFORCE),
    grad J = E_pi[ (r - beta f'(z)) grad log pi ].

So the regulariser enters as a *per-sample penalty* beta * f'(z) subtracted from the reward -- the same f' that is
the link of the direct preference loss (``FDivergence.link``): KL -> beta log z (the "k1" penalty), chi2 ->
beta (z - 1), chi2mix (chiPO's implicit regulariser) -> beta (z + log z). The penalised reward
r~ = r - beta f'(z) is treated as a constant (detached): its own dependence on theta is already accounted for by
the derivation above. z is computed in log space from L = log pi - log pi_ref with exp(min(L, exp_clamp))
(``chipo.divergences.clamped_exp``), so sequence-level ratios never overflow.

RLOO (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free"; Ahmadian et al. 2024): draw k >= 2
samples y_1..y_k per prompt and use the leave-one-out baseline::

    A_i = r~_i - 1/(k-1) sum_{j != i} r~_j,          loss = -1/k sum_i stopgrad(A_i) log pi(y_i).

Unbiasedness: y_i is independent of {y_j, j != i}, so E[b_i grad log pi(y_i)] = E[b_i] E_pi[grad log pi] = 0 for
the baseline b_i, and E[grad loss] = -grad J *exactly* (``tests/test_rl_estimator.py`` checks this to 1e-10 on a
tabular softmax policy by enumerating every k-tuple of responses).

KL estimators (``estimator``, only for ``regularizer=kl``; Schulman 2020, "Approximating KL divergence"):

* ``k1``: the f'-form above, penalty beta * L in the reward. Unbiased gradient of the reverse KL(pi || pi_ref).
  (Its per-sample value L is also the "k1" KL estimate, unbiased but negative on some samples.)
* ``k3``: GRPO-style (Shao et al. 2024): the rewards stay unpenalised and the *loss* gets
  + beta * mean_i k3(L_i), k3(L) = (1/z - 1) + log z = ``KL.f(L) / z`` (the summand of
  ``KL.estimate_from_policy``), differentiated through L with the samples held fixed. Its value is an unbiased,
  per-sample non-negative estimate of KL(pi || pi_ref), but its *gradient* is not that of the reverse KL:
  grad k3 = (1 - 1/z) grad log pi, and E_pi[(1 - 1/z) grad log pi] = sum_y (pi - pi_ref) grad log pi
  = -E_{pi_ref}[grad log pi] = grad KL(pi_ref || pi). So k3-in-the-loss optimises E_pi[r] - beta KL(pi_ref || pi),
  the *forward* KL (mass-covering), not the regulariser whose value it reports; the two gradients agree to
  first order near pi = pi_ref and differ far from it. The exact-gradient test asserts this identity.
  (Putting k1 in the loss instead would be worse: E_pi[grad L] = E_pi[grad log pi] = 0, no regularisation at all.)
  We apply k3 at the sequence level (z of the whole response), consistent with the rest of chipo; GRPO applies it
  per token.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from chipo.config import ConfigError, dump_yaml
from chipo.data import DataError
from chipo.data.prompts import load_prompts
from chipo.divergences import CHI2, KL, get_divergence
from chipo.generation import encode_prompts, generate
from chipo.io import atomic_directory, atomic_write_text, move_contents
from chipo.losses.rloo import exact_objective, rl_penalty, rloo_advantages, rloo_loss
from chipo.models import load_causal_lm, load_tokenizer
from chipo.rewards import load_scorer, score_checked
from chipo.sequences import batch_sequence_logps, choose_logprobs_impl, response_batch
from chipo.train.common import check_output_dir
from chipo.train.pairwise import NonFiniteError
from chipo.train.rl_config import ESTIMATORS, REGULARIZERS, RLConfig

logger = logging.getLogger("chipo")

__all__ = ["ESTIMATORS", "REGULARIZERS", "RLConfig", "RLTrainer", "exact_objective", "rl_penalty", "rloo_advantages",
           "rloo_loss", "run_rl"]


# ---------------------------------------------------------------------------------------------------- the trainer


def _load_prompt_rows(source: str, split: str, limit: int | None) -> list:
    """The 'prompt' column of a prompt dataset (strings or message lists)."""
    return load_prompts(source, split, limit).prompts


class PromptSet:
    """Tokenized prompts (ids as the data pipeline makes them) and the texts passed to reward functions."""

    def __init__(self, tokenizer, rows: list, source: str, max_prompt_length: int | None):
        try:
            self.ids, self.texts = encode_prompts(tokenizer, rows, max_prompt_length)
        except ValueError as e:
            raise DataError(source, str(e)) from None

    def __len__(self) -> int:
        return len(self.ids)


class RLTrainer:
    """RLOO policy-gradient training with a D_f regulariser (module docstring), plain AdamW loop.

    Each step: sample ``prompts_per_step`` prompts (a seeded permutation per pass over the data), ``k`` responses
    each from the current policy (HF generate, KV cache, seed derived from the step), score them with ``reward``,
    compute sequence log-probs under the policy and the frozen ``ref``, take one AdamW step on the RLOO surrogate
    ``rloo_loss``. Sampling and prompt order depend only on (seed, step), and checkpoints hold the policy, the
    optimizer, the step and the RNG states, so a resumed run retraces the uninterrupted one.

    ``eval_callback(policy, step) -> dict`` (optional) is called at every evaluation and its numbers are logged:
    the hook for the lab's richer evaluation (exact gold reward and divergences on the embedded world).
    """

    def __init__(self, config: RLConfig, policy, ref, tokenizer, reward, prompts: PromptSet, out: Path, *,
                 eval_prompts: PromptSet | None = None, gold=None, eval_callback=None):
        self.config, self.policy, self.ref, self.tokenizer = config, policy, ref, tokenizer
        self.reward, self.prompts, self.out = reward, prompts, Path(out)
        self.eval_prompts, self.gold, self.eval_callback = eval_prompts, gold, eval_callback
        self.divergence = get_divergence(config.regularizer)
        self.device = next(policy.parameters()).device
        self.ref.eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.impl = "logits"
        self.step = 0

    # --- data order and seeds: functions of (seed, step) only
    def batch_indices(self, step: int) -> list[int]:
        n, size = len(self.prompts), self.config.prompts_per_step
        out = []
        for position in range(step * size, (step + 1) * size):
            epoch, offset = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))
            out.append(int(order[offset]))
        return out

    def _sampling_seed(self, step: int) -> int:
        return (self.config.seed * 1_000_003 + step) % (2**62)

    # --- one step
    def _logps(self, model, prompt_ids: list, response_ids: list) -> Tensor:
        batch = {k: v.to(self.device) for k, v in response_batch(prompt_ids, response_ids, self.pad).items()}
        return batch_sequence_logps(model, batch, self.impl, self.config.logprob_chunk)

    def _score(self, scorer, texts: list[str], responses: list[str]) -> Tensor:
        try:
            return torch.from_numpy(score_checked(scorer, texts, responses))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"reward failed: {e}") from None

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        idx = self.batch_indices(step)
        prompt_ids = [self.prompts.ids[i] for i in idx]
        gen = generate(self.policy, self.tokenizer, prompt_ids, cfg.k, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, batch_size=cfg.generation_batch_size,
                       seed=self._sampling_seed(step))
        rewards = self._score(self.reward, [self.prompts.texts[idx[j]] for j in gen.prompt_index], gen.texts)
        rewards = rewards.view(len(idx), cfg.k).to(self.device)
        self.policy.train()
        chunk = cfg.mini_batch_prompts or len(idx)
        sums: dict[str, float] = {}
        log_ratio_max = -math.inf
        for start in range(0, len(idx), chunk):
            rows = range(start * cfg.k, min(start + chunk, len(idx)) * cfg.k)
            p_ids = [prompt_ids[gen.prompt_index[j]] for j in rows]
            r_ids = [gen.response_ids[j] for j in rows]
            with torch.no_grad():
                ref_logps = self._logps(self.ref, p_ids, r_ids).view(-1, cfg.k)
            logps = self._logps(self.policy, p_ids, r_ids).view(-1, cfg.k)
            losses, metrics = rloo_loss(logps, ref_logps, rewards[start:start + chunk], beta=cfg.beta,
                                        divergence=self.divergence, estimator=cfg.estimator,
                                        exp_clamp=cfg.exp_clamp)
            # Sum over the chunk / all prompts of the step: chunks add up to the full-batch mean gradient.
            (losses.sum() / len(idx)).backward()
            sums["loss"] = sums.get("loss", 0.0) + float(losses.detach().sum())
            for name, value in metrics.items():
                if name == "log_ratio_max":
                    log_ratio_max = max(log_ratio_max, float(value.max()))
                else:
                    sums[name] = sums.get(name, 0.0) + float(value.sum())
        if not math.isfinite(sums["loss"]):
            raise NonFiniteError(f"non-finite RL loss at step {step + 1}; the last good checkpoint is kept in "
                                 f"{self.out}")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm or float("inf"))
        if not torch.isfinite(grad_norm):
            raise NonFiniteError(f"non-finite gradient at step {step + 1}; the last good checkpoint is kept in "
                                 f"{self.out}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        record = {name: value / len(idx) for name, value in sums.items()}
        record.update(log_ratio_max=log_ratio_max, grad_norm=float(grad_norm),
                      response_length=float(gen.lengths().mean()), finished=sum(gen.finished) / len(gen.finished))
        return record

    # --- evaluation
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Proxy (and gold) reward, KL / chi2 estimates and length on the evaluation prompts, fixed sampling seed."""
        cfg, prompts = self.config, self.eval_prompts
        gen = generate(self.policy, self.tokenizer, prompts.ids, cfg.eval_samples, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, batch_size=cfg.generation_batch_size, seed=cfg.seed + 12345)
        texts = [prompts.texts[i] for i in gen.prompt_index]
        p_ids = [prompts.ids[i] for i in gen.prompt_index]
        out = {"eval_reward": float(self._score(self.reward, texts, gen.texts).mean())}
        if self.gold is not None:
            out["eval_gold"] = float(self._score(self.gold, texts, gen.texts).mean())
        log_ratio = (self._logps(self.policy, p_ids, gen.response_ids)
                     - self._logps(self.ref, p_ids, gen.response_ids)).double()
        out.update(eval_kl_k1=float(log_ratio.mean()), eval_kl_k3=float(KL.estimate_from_policy(log_ratio)),
                   eval_chi2=float(CHI2.estimate_from_policy(log_ratio)),
                   eval_response_length=float(gen.lengths().mean()))
        if self.eval_callback is not None:
            out.update({f"eval_{k}": v for k, v in self.eval_callback(self.policy, step).items()})
        return out

    # --- checkpoints
    def save_checkpoint(self, step: int) -> Path:
        """Policy + optimizer + step + RNG states in ``checkpoint-<step>``, written to a temp dir and renamed."""
        final = self.out / f"checkpoint-{step}"
        with atomic_directory(final) as tmp:
            self.policy.save_pretrained(tmp)
            state = {"step": step, "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                     "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}
            torch.save(state, tmp / "rl_state.pt")
        limit = self.config.save_total_limit
        if limit is not None:
            for old in list_checkpoints(self.out)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_state(self, checkpoint: Path) -> None:
        state = torch.load(Path(checkpoint) / "rl_state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        self.step = int(state["step"])
        _truncate_metrics(self.out / "metrics.jsonl", self.step)

    # --- the loop
    def train(self) -> None:
        cfg = self.config
        probe = response_batch(self.prompts.ids[:1], [[self.tokenizer.eos_token_id]], self.pad)
        self.impl = choose_logprobs_impl(self.policy, {k: v.to(self.device) for k, v in probe.items()},
                                         cfg.logprobs_impl)
        if self.step == 0 and cfg.eval_every and self.eval_prompts is not None:
            self._log({"step": 0, **self.evaluate(0)})
        bar = tqdm(range(self.step, cfg.max_steps), initial=self.step, total=cfg.max_steps, desc="chipo rl",
                   unit="step", disable=cfg.disable_tqdm)
        for step in bar:
            record = self.train_step(step)
            self.step = step + 1
            record = {"step": self.step, **record}
            if cfg.eval_every and self.eval_prompts is not None and self.step % cfg.eval_every == 0:
                record.update(self.evaluate(self.step))
            if self.step % cfg.logging_steps == 0 or "eval_reward" in record:
                self._log(record)
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl_k3']:.3f}")
            if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.max_steps):
                self.save_checkpoint(self.step)  # also at the end, so a later run can extend max_steps and resume

    def _log(self, record: dict) -> None:
        line = json.dumps(record)
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(line + "\n")
        tqdm.write(line, file=sys.stdout)

    def save_final(self) -> None:
        """The final HF policy + tokenizer in ``output_dir`` (temp dir inside it, then renamed into place)."""
        tmp = Path(tempfile.mkdtemp(dir=self.out, prefix=".final-"))
        try:
            self.policy.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            move_contents(tmp, self.out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def list_checkpoints(out: Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` directories, oldest first."""
    found = [p for p in Path(out).glob("checkpoint-*") if (p / "rl_state.pt").is_file() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written by the interrupted run after its last checkpoint)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def run_rl(config: RLConfig, eval_callback=None) -> Path:
    """Run ``chipo rl``: validate everything, then train; returns the output directory with the final policy."""
    tokenizer = load_tokenizer(config.tokenizer or config.policy)
    prompts = PromptSet(tokenizer, _load_prompt_rows(config.prompts, config.prompts_split, config.max_prompts),
                        config.prompts, config.max_prompt_length)
    eval_prompts = None
    if config.eval_every:
        source = config.eval_prompts or config.prompts
        eval_prompts = PromptSet(tokenizer, _load_prompt_rows(source, config.eval_split, config.max_eval_prompts),
                                 source, config.max_prompt_length)
    reward = load_scorer(config.reward)
    gold = load_scorer(config.gold) if config.gold else None
    for name, scorer in (("reward", reward), ("gold", gold)):
        if scorer is not None:
            try:  # pre-flight: a broken reward fails here, before the output directory exists
                score_checked(scorer, prompts.texts[:1], ["test"])
            except Exception as e:  # noqa: BLE001 -- any failure of user code becomes one config error line
                raise ConfigError(f"{name} {getattr(scorer, 'name', '')} failed on a test pair: {e}") from None
    out = check_output_dir(config)
    resume = None
    if config.resume_from_checkpoint:
        resume = (list_checkpoints(out)[-1:] or [None])[0] if config.resume_from_checkpoint == "latest" \
            else Path(config.resume_from_checkpoint)
        if resume is None:
            logger.warning("resume_from_checkpoint=latest but no checkpoint in %s: starting fresh", out)
        elif not (resume / "rl_state.pt").is_file():
            raise ConfigError(f"{resume} is not a chipo rl checkpoint (no rl_state.pt)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    policy = load_causal_lm(str(resume) if resume else config.policy, device=device)
    # pi_ref: the *initial* policy, also on resume
    ref = load_causal_lm(config.ref_model or config.policy, device=device)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "run_config.yaml", dump_yaml(config))
    trainer = RLTrainer(config, policy, ref, tokenizer, reward, prompts, out, eval_prompts=eval_prompts, gold=gold,
                        eval_callback=eval_callback)
    if resume is not None:
        trainer.load_state(resume)
        logger.info("resumed from %s at step %d", resume, trainer.step)
    trainer.train()
    trainer.save_final()
    return out
