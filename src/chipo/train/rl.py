"""Online RL with a choice of f-divergence regulariser: the ``chipo rl`` trainer (RLOO on ``accelerate``).

Objective per prompt x: J(theta) = E_{y ~ pi_theta}[r(x, y)] - beta D_f(pi_theta || pi_ref) over whole sequences.
Since grad z = z grad log pi for z = pi / pi_ref, grad J = E_pi[(r - beta f'(z)) grad log pi]: the regulariser is
a per-sample penalty beta f'(z) (KL: beta log z; chi2: beta (z - 1); chi2mix, chiPO's implicit regulariser of
Huang et al. 2024, arXiv 2407.13399: beta (z + log z)). With k >= 2 samples per prompt, the RLOO leave-one-out
baseline (Kool et al. 2019; Ahmadian et al. 2024) keeps the gradient estimate unbiased. The losses and the KL
estimators (k1, k3) are pure functions in ``chipo.losses.rloo`` (derivations there; ``tests/test_rl_estimator.py``
checks E[grad loss] = -grad J exactly on a tabular policy).

One optimizer step (``chipo.train.sampled.SampledTrainer.train_step`` with this module's ``rollout`` and
``micro_loss``):

1. The step's ``prompts_per_step`` = P prompts (a seeded permutation per pass over the data, a function of
   (seed, step) only) are split evenly over the N processes; each process samples k responses for its P / N
   prompts. Sampling runs in chunks of ``generation_batch_size // k`` prompts aligned to positions in the
   step's batch, each seeded by (seed, step, position of its first prompt): process-specific, deterministic, and
   the same draws on 1 or N processes when the chunk size divides P / N.
2. Rewards, then log pi (with gradient) and log pi_ref of every sample, in ``gradient_accumulation_steps`` = G
   micro-batches of m = P / (N G) prompts each; the loss of a micro-batch is the *mean* of its m per-prompt RLOO
   losses. accelerate divides it by G and DDP averages the N processes' gradients, so the gradient is
   (1/N)(1/G) sum_{micro-batches} (1/m) sum_i grad loss_i = (1/P) sum_{all P prompts} grad loss_i: exactly the
   one-process full-batch gradient of the mean RLOO loss (up to float round-off of the all-reduce).
3. Per-prompt metrics of every process are gathered and averaged over the step's prompts (``log_ratio_max``:
   the maximum), then logged by the main process. A non-finite loss or gradient norm stops the run *before*
   the optimizer step, naming the step (``NonFiniteError``); the last good checkpoint stays.

Dropout is off in the forward that builds the loss (the policy runs in eval mode; gradients flow all the same).
The estimator is for the deterministic network pi_theta: log pi(y|x) is the quantity whose gradient the score
function identity E_pi[grad log pi] = 0 and the ratio z = pi / pi_ref refer to. With dropout (GPT-2 has 0.1),
log pi becomes a random variable log pi_{theta, mask}; z = exp(log pi_mask - log pi_ref) is then a ratio of a
perturbed network to a clean one, and since exp is convex, E_mask[z] != z -- the penalty f'(z), the KL/chi2
estimates and the gradient all pick up a bias of the order of the dropout noise, and the samples (drawn with
dropout off) no longer come from the distribution being differentiated.

``gradient_checkpointing=true`` stays active in eval mode: HF checkpointing layers test their own ``training``
flag, which is set back on for those layers alone (a layer that applies dropout itself on that flag, as OPT/BART
decoder layers do, would then drop out: chipo warns when the policy's config has a nonzero dropout).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from chipo.data import DataError
from chipo.divergences import CHI2, KL, get_divergence
from chipo.generation import encode_prompts, generate
from chipo.losses.rloo import exact_objective, rl_penalty, rloo_advantages, rloo_loss
from chipo.sequences import batch_sequence_logps, packing_supported, response_batch, sequence_logps
from chipo.train.loop import prompt_order
from chipo.train.rl_config import ESTIMATORS, REGULARIZERS, RLConfig
from chipo.train.sampled import SampledTrainer, score_or_fail

logger = logging.getLogger("chipo")

__all__ = ["ESTIMATORS", "REGULARIZERS", "PromptSet", "RLConfig", "RLTrainer", "dropout_off", "exact_objective",
           "rl_penalty", "rloo_advantages", "rloo_loss"]

MEAN_METRICS = ("loss", "reward", "penalized_reward", "penalty", "kl_k1", "kl_k3", "chi2")


class PromptSet:
    """Tokenized prompts (ids as the data pipeline makes them) and the texts passed to reward functions."""

    def __init__(self, tokenizer, rows: list, source: str, max_prompt_length: int | None):
        try:
            self.ids, self.texts = encode_prompts(tokenizer, rows, max_prompt_length)
        except ValueError as e:
            raise DataError(source, str(e)) from None

    def __len__(self) -> int:
        return len(self.ids)


def dropout_off(model) -> None:
    """Eval mode for the whole model (dropout off), keeping HF gradient checkpointing active (module docstring)."""
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True


@dataclass
class Rollout:
    """One step's samples on this process: k responses per prompt (prompt-major) and their rewards [m, k]."""

    prompt_ids: list
    response_ids: list
    finished: list
    rewards: Tensor

    def __len__(self) -> int:
        return len(self.prompt_ids)


def derived_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing): distinct tuples, unrelated streams."""
    high, low = np.random.SeedSequence([int(v) for v in values]).generate_state(2)
    return (int(high) << 31 | int(low) >> 1) & (2**63 - 1)


class RLTrainer(SampledTrainer):
    """RLOO policy-gradient training with a D_f regulariser on the shared sampled-data loop (module docstring;
    ``chipo.train.sampled.SampledTrainer`` does the step, accumulation, logging, checkpoints and callbacks).

    ``policy`` is prepared there (DDP or DeepSpeed ZeRO-1/2 as launched; every process keeps full parameters to
    sample from, so FSDP and ZeRO-3 are refused); ``ref`` is frozen on the process's device.
    ``eval_callback(policy, step) -> dict`` (optional) runs on the main process at every evaluation with the
    unwrapped policy and its numbers are logged with an ``eval_`` prefix: the hook for the lab's exact evaluation.
    """

    name = "chipo rl"
    kind = "RL"

    def __init__(self, config: RLConfig, accelerator, policy, ref, tokenizer, reward, prompts: PromptSet, out, *,
                 eval_prompts: PromptSet | None = None, gold=None, eval_callback=None, impl: str = "logits",
                 callbacks=()):
        super().__init__(config, accelerator, policy, ref, tokenizer, out, callbacks=callbacks)
        self.reward, self.prompts = reward, prompts
        self.eval_prompts, self.gold, self.eval_callback = eval_prompts, gold, eval_callback
        self.divergence = get_divergence(config.regularizer)
        self.impl = impl

    @property
    def evaluating(self) -> bool:
        return self.eval_prompts is not None

    def postfix(self, record: dict) -> dict:
        return {"reward": f"{record['reward']:.3f}", "kl": f"{record['kl_k3']:.3f}"}

    # --- data order and seeds: functions of (seed, step, position) only
    def batch_indices(self, step: int) -> list[int]:
        """Prompt indices of step ``step``'s global batch (``chipo.train.loop.prompt_order``)."""
        return prompt_order(len(self.prompts), self.config.prompts_per_step, self.config.seed, step)

    def local_positions(self, total: int, even: bool) -> range:
        """This process's contiguous share of ``total`` batch positions (equal shares when ``even``)."""
        n, rank = self.accelerator.num_processes, self.accelerator.process_index
        if even:
            return range(rank * total // n, (rank + 1) * total // n)
        bounds = np.linspace(0, total, n + 1).round().astype(int)
        return range(int(bounds[rank]), int(bounds[rank + 1]))

    def sample(self, prompt_ids: list, positions: range, count: int, seed_of) -> tuple[list, list, list]:
        """``count`` responses per prompt, in chunks aligned to batch positions (module docstring, step 1)."""
        chunk = max(1, self.config.generation_batch_size // count)
        response_ids, texts, finished = [], [], []
        start = 0
        while start < len(positions):
            end = start + 1
            while end < len(positions) and positions[end] // chunk == positions[start] // chunk:
                end += 1
            gen = generate(self.policy, self.tokenizer, prompt_ids[start:end], count,
                           max_new_tokens=self.config.max_new_tokens, temperature=self.config.temperature,
                           batch_size=(end - start) * count, seed=seed_of(positions[start]))
            response_ids += gen.response_ids
            texts += gen.texts
            finished += gen.finished
            start = end
        return response_ids, texts, finished

    def _score(self, scorer, texts: list[str], responses: list[str]) -> Tensor:
        return torch.from_numpy(score_or_fail(scorer, texts, responses, "reward"))

    def _reduce(self, sums: list[Tensor | float], maxima: list[Tensor | float]) -> tuple[list[float], list[float]]:
        """Sums and maxima over processes (one all-reduce and one gather), as Python floats."""
        device = self.accelerator.device
        total = self.accelerator.reduce(torch.stack([torch.as_tensor(s, dtype=torch.float64, device=device)
                                                     for s in sums]), reduction="sum")
        top = torch.stack([torch.as_tensor(m, dtype=torch.float64, device=device) for m in maxima])
        top = self.accelerator.gather(top).view(-1, len(maxima)).max(0).values
        return total.tolist(), top.tolist()

    def packed(self, batch: dict[str, Tensor]) -> bool:
        """Whether the log-prob passes run packed: ``packing`` on and both the policy and pi_ref reproduce the
        padded layout (``chipo.sequences.packing_supported``: checked on the first batch, remembered per model).
        One forward either way, so the choice is DDP-safe; the two models may differ (``ref_model``)."""
        return bool(self.config.packing and packing_supported(self.policy, batch, self.impl)
                    and packing_supported(self.ref, batch, self.impl))

    # --- one step: sample and score (module docstring, step 1), then the loss per micro-batch (step 2)
    def rollout(self, step: int) -> Rollout:
        cfg = self.config
        idx = self.batch_indices(step)
        positions = self.local_positions(len(idx), even=True)
        prompt_ids = [self.prompts.ids[idx[p]] for p in positions]
        texts = [self.prompts.texts[idx[p]] for p in positions for _ in range(cfg.k)]
        response_ids, responses, finished = self.sample(prompt_ids, positions, cfg.k,
                                                        lambda p: derived_seed(cfg.seed, 0, step, p))
        rewards = self._score(self.reward, texts, responses).view(len(positions), cfg.k).to(self.accelerator.device)
        return Rollout(prompt_ids, response_ids, finished, rewards)

    def micro_loss(self, rollout: Rollout, part: slice) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, k, device = self.config, self.config.k, self.accelerator.device
        rows = range(part.start * k, part.stop * k)
        p_ids = [rollout.prompt_ids[j // k] for j in rows]
        r_ids = [rollout.response_ids[j] for j in rows]
        batch = {key: v.to(device) for key, v in response_batch(p_ids, r_ids, self.pad).items()}
        # Before dropout_off: the once-per-model check toggles eval/train, which would unset the
        # gradient-checkpointing flags that dropout_off keeps on.
        packed = self.packed(batch)
        dropout_off(self.model)  # log pi of the deterministic network (module docstring)
        with torch.no_grad():
            ref_logps = batch_sequence_logps(self.ref, batch, self.impl, cfg.logprob_chunk,
                                             packed=packed).view(-1, k)
        logps = batch_sequence_logps(self.model, batch, self.impl, cfg.logprob_chunk, packed=packed).view(-1, k)
        losses, metrics = rloo_loss(logps, ref_logps, rollout.rewards[part], beta=cfg.beta,
                                    divergence=self.divergence, estimator=cfg.estimator, exp_clamp=cfg.exp_clamp)
        # Per-prompt means over its k samples: their mean over prompts is the mean over all sequences.
        lengths = torch.tensor([len(ids) - int(done) for ids, done in zip(r_ids, (rollout.finished[j] for j in rows))],
                               dtype=torch.float64, device=device).view(-1, k)
        done = torch.tensor([float(rollout.finished[j]) for j in rows], dtype=torch.float64, device=device)
        columns = {name: metrics[name] for name in (*MEAN_METRICS[1:], "log_ratio_max")}
        columns.update(response_length=lengths.mean(1), finished=done.view(-1, k).mean(1))
        return losses, columns

    def summarize(self, columns: dict[str, Tensor]) -> dict[str, float]:
        record = {name: float(column.mean()) for name, column in columns.items() if name != "log_ratio_max"}
        record["log_ratio_max"] = float(columns["log_ratio_max"].max())
        return record

    # --- evaluation
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Proxy (and gold) reward, KL / chi2 estimates and length on the evaluation prompts, fixed sampling seeds."""
        cfg, prompts = self.config, self.eval_prompts
        positions = self.local_positions(len(prompts), even=False)
        count = cfg.eval_samples
        sums = [0.0] * 6  # reward, gold, kl_k1, kl_k3, chi2, length (sums over samples); then the sample count
        if len(positions):
            p_ids = [prompts.ids[p] for p in positions]
            response_ids, responses, finished = self.sample(p_ids, positions, count,
                                                            lambda p: derived_seed(cfg.seed, 1, p))
            texts = [prompts.texts[p] for p in positions for _ in range(count)]
            rows = [ids for ids in p_ids for _ in range(count)]
            policy = self.policy
            dropout_off(policy)
            log_ratio = (sequence_logps(policy, rows, response_ids, self.pad, impl=self.impl, packed=cfg.packing)
                         - sequence_logps(self.ref, rows, response_ids, self.pad, impl=self.impl,
                                          packed=cfg.packing)).double()
            n = len(response_ids)
            sums = [float(self._score(self.reward, texts, responses).sum()),
                    float(self._score(self.gold, texts, responses).sum()) if self.gold is not None else 0.0,
                    float(log_ratio.sum()), n * float(KL.estimate_from_policy(log_ratio, cfg.exp_clamp)),
                    n * float(CHI2.estimate_from_policy(log_ratio, cfg.exp_clamp)),
                    float(sum(len(ids) - int(done) for ids, done in zip(response_ids, finished)))]
        totals, _ = self._reduce([*sums, float(len(positions) * count)], [0.0])
        names = ("eval_reward", "eval_gold", "eval_kl_k1", "eval_kl_k3", "eval_chi2", "eval_response_length")
        out = {name: totals[i] / totals[-1] for i, name in enumerate(names) if name != "eval_gold" or self.gold}
        if self.eval_callback is not None and self.accelerator.is_main_process:
            out.update({f"eval_{key}": value for key, value in self.eval_callback(self.policy, step).items()})
        return out
