"""``chipo online``: online preference optimization -- online DPO / chiPO, XPO and Nash-MD -- on ``accelerate``.

Each step takes ``prompts_per_step`` prompts (a seeded permutation per pass over the data), samples two responses
per prompt, asks the judge which is better (one label per pair) and takes one AdamW step:

* pairwise losses (``loss=dpo|chipo|ipo|...``): y_a, y_b ~ pi (online DPO / chiPO), or with ``exploration=xpo``
  y_a ~ pi, y_b ~ pi_ref plus XPO's bonus alpha * log pi(y_b) (``chipo.losses.online``); the labelled pair goes
  through ``chipo.losses.preference_loss`` with every option of the offline trainer. Ties and items without a
  verdict contribute no preference term.
* ``loss=nash-md``: y_a ~ pi, y_b ~ pi^(1-m) pi_ref^m (token-level geometric mixture), Nash-MD-PG's loss on y_a.

Sampling uses the token-by-token loop of ``chipo.train.online_sampling``, not ``chipo.generation.generate``: the
mixture needs both models' next-token logits at every step (a KV cache per model), and the same loop gives every
response a random stream of its own -- Gumbel-max noise from a counter-based hash of (seed, step, prompt position,
stream, token position, token id) -- so responses, and hence losses, do not depend on how prompts are split across
processes or batched. Labels (Bradley-Terry draws) use the same hash. 2 processes reproduce 1 process (tested to
1e-5): the shared loop (``chipo.train.sampled``) backpropagates each micro-batch's mean pair loss, divided by
the accumulation steps, and DDP averages the processes: the gradient of the mean over the step's pairs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from chipo.config import ConfigError
from chipo.data import DataError
from chipo.data.prompts import load_prompts
from chipo.divergences import CHI2, KL, get_divergence
from chipo.generation import decode_response, encode_prompts
from chipo.judges import OpenAIJudgeConfig, PairwisePrompt, build_judge
from chipo.judges.prompt import TLDR_PROMPT
from chipo.losses import preference_loss
from chipo.losses.online import nash_md_loss, policy_penalty, preference_probability, sample_labels, xpo_bonus
from chipo.models import load_causal_lm, load_tokenizer, pad_id
from chipo.rewards import load_scorer
from chipo.sequences import batch_sequence_logps, choose_logprobs_impl, packing_supported, response_batch
from chipo.train.common import check_output_dir
from chipo.train.loop import prompt_order
from chipo.train.monitor_callback import sampled_monitor
from chipo.train.online_config import OnlineConfig
from chipo.train.online_sampling import as_int64, sample, stream_key, uniforms
from chipo.train.sampled import SampledTrainer, check_split, make_accelerator, run_sampled, score_or_fail

logger = logging.getLogger("chipo")

__all__ = ["GENERAL_PROMPT", "OnlineConfig", "OnlineTrainer", "PreferenceOracle", "run_online"]

GENERAL_PROMPT = PairwisePrompt(
    version="general-pairwise-v1",
    system="You are a careful, impartial judge of responses. You are not swayed by the order in which the "
           "responses are shown or by their length alone.",
    user=("Below is a prompt and two candidate responses to it.\n\n### Prompt\n{prompt}\n\n### Response A\n{first}"
          "\n\n### Response B\n{second}\n\nWhich response is better: more helpful, correct and clear? Compare them "
          "in at most two sentences. Then write the verdict as the final line, exactly in this format:\n"
          "Preferred: A\nor\nPreferred: B"),
)

# ------------------------------------------------------------------------------------------------- labels


class PreferenceOracle:
    """P(a > b | x) per pair from a scorer (``label`` bt: sigmoid(r_a - r_b); argmax: 1, 0, 1/2) or the LLM judge
    (its verdict: 1, 0, 1/2, or NaN for no verdict). One call per pair is one label of the budget."""

    def __init__(self, config: OnlineConfig):
        self.mode, self.judge, self.scorer = config.label, None, None
        if config.judge == "openai":
            # The judge's own deadline: judge_timeout bounds each request attempt (connect, headers, whole reply)
            # and each read, so a hanging server costs at most judge_max_attempts x judge_timeout per item.
            judge_config = OpenAIJudgeConfig(base_url=config.judge_base_url, model=config.judge_model,
                                             cache=config.judge_cache, max_concurrency=config.judge_max_concurrency,
                                             max_attempts=config.judge_max_attempts, seed=config.seed,
                                             timeout_s=config.judge_timeout, deadline_s=config.judge_timeout)
            prompt = GENERAL_PROMPT if config.judge_prompt == "general" else TLDR_PROMPT
            self.judge = build_judge("openai", judge_config, prompt=prompt)
            self.name = self.judge.name
        else:
            self.scorer = load_scorer(config.judge)
            self.name = getattr(self.scorer, "name", config.judge)

    @property
    def samples_labels(self) -> bool:
        """Pairwise labels are Bernoulli draws from the probability (Bradley-Terry scorers), else the verdict."""
        return self.scorer is not None and self.mode == "bt"

    def probabilities(self, prompts: list[str], a: list[str], b: list[str]) -> torch.Tensor:
        if self.judge is not None:
            result = self.judge.judge(prompts, a, b)
            return torch.tensor([math.nan if o is None else o for o in result.outcomes], dtype=torch.float64)
        scores = torch.from_numpy(score_or_fail(self.scorer, prompts + prompts, a + b, "judge"))
        return preference_probability(scores[:len(a)], scores[len(a):], self.mode)


# ------------------------------------------------------------------------------------------------- the trainer


@dataclass
class Pairs:
    """One step's labelled pairs on this process: prompts, the two responses (token ids, finished) and labels."""

    prompt_ids: list
    a: list
    b: list
    prob: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompt_ids)


PER_PAIR = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "clipped", "loss/preference", "loss/score", "rewards/probabilities")
"""Metrics of the preference term: averaged over the labelled pairs only (ties and missing verdicts excluded)."""


class OnlineTrainer(SampledTrainer):
    """The online loop (module docstring) on the shared sampled-data loop (``chipo.train.sampled``).

    Prompt order, sampling and labels are functions of (seed, step, prompt position) only, and checkpoints hold the
    accelerate state (policy, optimizer, RNG) plus the step and the labels spent, so a resumed run retraces the
    uninterrupted one.
    """

    name = "chipo online"
    kind = "online"

    def __init__(self, config: OnlineConfig, accelerator, policy, ref, tokenizer, oracle: PreferenceOracle,
                 prompt_ids: list[list[int]], prompt_texts: list[str], out: Path, *, impl: str = "logits",
                 callbacks=()):
        super().__init__(config, accelerator, policy, ref, tokenizer, out, callbacks=callbacks)
        self.oracle, self.prompt_ids, self.prompt_texts = oracle, prompt_ids, prompt_texts
        self.divergence = get_divergence(config.regularizer or "kl")
        self.impl, self.labels = impl, 0
        self.monitored = any(getattr(c, "monitor", None) is not None for c in self.callbacks)

    @property
    def evaluating(self) -> bool:
        """chipo online's evaluations are the overoptimization monitor's (``monitor``, ``eval_steps``): the
        callback adds its gold-free signals to the evaluation's metrics."""
        return self.monitored

    def total_steps(self) -> int:
        return self.config.last_step()

    def checkpoint_state(self) -> dict:
        return {"labels": self.labels}

    def restore_state(self, state: dict) -> None:
        self.labels = int(state["labels"])

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss']:.3f}", "kl": f"{record['kl']:.3f}", "labels": self.labels}

    # --- data order and randomness: functions of (seed, step, position) only
    def batch_indices(self, step: int) -> list[int]:
        return prompt_order(len(self.prompt_ids), self.config.prompts_per_step, self.config.seed, step)

    def _local_positions(self) -> range:
        per = self.config.prompts_per_step // self.accelerator.num_processes
        return range(self.accelerator.process_index * per, (self.accelerator.process_index + 1) * per)

    def _logps(self, model, prompt_ids, response_ids) -> torch.Tensor:
        batch = {k: v.to(self.accelerator.device) for k, v in response_batch(prompt_ids, response_ids,
                                                                             self.pad).items()}
        # Packed rows when ``packing`` is on and this model reproduces the padded layout (checked on its first
        # batch, remembered per model object): one forward either way, so DDP-safe.
        packed = self.config.packing and packing_supported(self.accelerator.unwrap_model(model), batch, self.impl)
        return batch_sequence_logps(model, batch, self.impl, self.config.logprob_chunk, packed=packed).float()

    # --- one step: sample two responses per prompt and label them, then the loss per micro-batch
    def rollout(self, step: int) -> Pairs:
        cfg, acc = self.config, self.accelerator
        index = self.batch_indices(step)
        local = list(self._local_positions())
        p_ids = [self.prompt_ids[index[j]] for j in local]
        texts = [self.prompt_texts[index[j]] for j in local]
        keys = [[stream_key(cfg.seed, step, j, s) for j in local] for s in range(3)]
        policy = self.policy
        opts = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad)
        if cfg.nash_md or cfg.exploration == "xpo":
            a = sample(policy, None, p_ids, keys[0], **opts)
            b = (sample(policy, self.ref, p_ids, keys[1], mixture_coef=cfg.mixture_coef, **opts) if cfg.nash_md
                 else sample(self.ref, None, p_ids, keys[1], **opts))
        else:  # both responses from pi: one sampling loop over twice the rows (each row has its own random stream)
            both = sample(policy, None, p_ids + p_ids, keys[0] + keys[1], **opts)
            a, b = both[:len(p_ids)], both[len(p_ids):]
        decode = lambda rows: [decode_response(self.tokenizer, ids, done) for ids, done in rows]  # noqa: E731
        prob = self.oracle.probabilities(texts, decode(a), decode(b)).to(acc.device)
        if self.oracle.samples_labels and not cfg.nash_md:
            u = uniforms(torch.tensor([as_int64(k) for k in keys[2]], device=acc.device), 0, 1)[:, 0]
            label = sample_labels(prob, u)
        else:
            label = prob
        return Pairs(p_ids, a, b, prob, label)

    def micro_loss(self, pairs: Pairs, part: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, device = self.config, self.accelerator.device
        p_ids, a, b = pairs.prompt_ids[part], pairs.a[part], pairs.b[part]
        prob, label = pairs.prob[part], pairs.label[part]
        missing = torch.isnan(prob)
        self.model.train()
        n = len(p_ids)
        rows = [ids for ids, _ in a] + ([] if cfg.nash_md else [ids for ids, _ in b])
        logps = self._logps(self.model, p_ids * (len(rows) // n), rows)
        with torch.no_grad():
            ref_logps = self._logps(self.ref, p_ids * (len(rows) // n), rows)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.float32, device=device)
        policy_samples = slice(0, n) if cfg.nash_md or cfg.exploration == "xpo" else slice(0, 2 * n)
        columns: dict[str, torch.Tensor] = {}
        if cfg.nash_md:
            losses, metrics = nash_md_loss(logps, ref_logps, torch.where(missing, 0.5, prob), beta=cfg.beta,
                                           divergence=self.divergence, exp_clamp=cfg.exp_clamp)
            kept = ~missing
            columns.update({k: metrics[k] for k in ("loss/score", "loss/kl", "rewards/probabilities",
                                                    "logps/chosen")})
        else:
            kept = (label == 1.0) | (label == 0.0)
            a_wins = label == 1.0
            lp_a, lp_b, lr_a, lr_b = logps[:n], logps[n:], ref_logps[:n], ref_logps[n:]
            pick = lambda x, y, first: torch.where(first, x, y)  # noqa: E731
            pair, metrics = preference_loss(
                cfg.loss, pick(lp_a, lp_b, a_wins), pick(lp_b, lp_a, a_wins), pick(lr_a, lr_b, a_wins),
                pick(lr_b, lr_a, a_wins), beta=cfg.beta, chosen_lengths=pick(lengths[:n], lengths[n:], a_wins),
                rejected_lengths=pick(lengths[n:], lengths[:n], a_wins), mask=kept, **cfg.loss_options())
            losses = pair
            for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                         "logps/chosen", "logps/rejected", "clipped"):
                columns[name] = metrics[name]
            if cfg.exploration == "xpo":
                bonus = xpo_bonus(lp_b, lr_b, cfg.xpo_alpha)
                losses = losses + bonus
                columns["loss/xpo"] = bonus.detach()
            penalty_options = cfg.penalty_options()
            if penalty_options:  # beta grad D_f(pi || pi_ref) on the policy's own samples (chipo.losses.online)
                penalty = policy_penalty(logps[policy_samples].view(-1, n), ref_logps[policy_samples].view(-1, n),
                                         exp_clamp=cfg.exp_clamp, **penalty_options).mean(0)
                losses = losses + penalty
                columns["loss/penalty"] = penalty.detach()
            columns["loss/preference"] = pair.detach()
            columns["labels/ties"] = ((label == 0.5) & ~missing).float()
        log_ratio = (logps - ref_logps).detach()[policy_samples].double().view(-1, n)
        weight = torch.exp(torch.clamp(-log_ratio, max=cfg.exp_clamp))
        columns.update({
            "kept": kept.float(), "labels/missing": missing.float(),
            "kl": (KL.f(log_ratio, cfg.exp_clamp) * weight).mean(0), "kl_k1": log_ratio.mean(0),
            "chi2": (CHI2.f(log_ratio, cfg.exp_clamp) * weight).mean(0),
            "response_length": torch.tensor([float(len(ids) - done) for ids, done in a], device=device),
        })
        return losses, columns

    def summarize(self, columns: dict[str, torch.Tensor]) -> dict[str, float]:
        """Means over the step's pairs on all processes: pair metrics over labelled pairs, the rest over all."""
        self.labels += self.config.prompts_per_step
        values = dict(columns)
        kept = values.pop("kept").bool()
        record = {}
        for name, column in values.items():
            if name.startswith("labels/"):
                record[name] = float(column.sum())
            elif name in PER_PAIR:
                record[name] = float(column[kept].mean()) if kept.any() else math.nan
            else:
                record[name] = float(column.mean())
        record.update({"labels/step": float(len(kept)), "labels": self.labels})
        return record


def run_online(config: OnlineConfig, callbacks=()) -> Path:
    """Run ``chipo online``: validate everything, then train; returns the output directory with the final policy.
    ``callbacks``: ``transformers.TrainerCallback``s (``chipo.train.sampled``)."""
    accelerator = make_accelerator(config, "chipo online")
    check_split(config, accelerator)
    tokenizer = load_tokenizer(config.tokenizer or config.policy)
    rows = load_prompts(config.prompts, config.prompts_split, config.max_prompts).prompts
    try:
        prompt_ids, prompt_texts = encode_prompts(tokenizer, rows, config.max_prompt_length)
    except ValueError as e:
        raise DataError(config.prompts, str(e)) from None
    oracle = PreferenceOracle(config)
    if oracle.scorer is not None:
        try:  # pre-flight: a broken scorer fails here, before the output directory exists
            oracle.probabilities(prompt_texts[:1], ["test"], ["test two"])
        except Exception as e:  # noqa: BLE001 -- any failure of user code becomes one config error line
            raise ConfigError(f"judge {oracle.name} failed on a test pair: {e}") from None
    check_output_dir(config)
    torch.manual_seed(config.seed)
    policy = load_causal_lm(config.policy)
    ref = load_causal_lm(config.ref_model or config.policy)  # pi_ref: the initial policy, also on resume
    pad = pad_id(tokenizer)
    probe = {k: v.to(accelerator.device) for k, v in response_batch(prompt_ids[:2], [[tokenizer.eos_token_id]] * 2,
                                                                    pad).items()}
    impl = choose_logprobs_impl(policy.to(accelerator.device), probe, config.logprobs_impl)
    if config.last_step() < config.max_steps:
        logger.info("label budget max_labels=%d allows %d steps", config.max_labels, config.last_step())

    monitor = None
    if config.every("eval"):
        if config.monitor == "off":
            raise ConfigError("chipo online evaluates only the overoptimization monitor's signals: eval_steps with "
                              "monitor=off does nothing (drop eval_steps, or set monitor=log|warn|stop)")
        eval_rows = rows if config.eval_prompts is None else load_prompts(
            config.eval_prompts, config.eval_split, config.max_eval_prompts).prompts
        try:
            eval_ids, _ = encode_prompts(tokenizer, eval_rows[:config.max_eval_prompts], config.max_prompt_length)
        except ValueError as e:
            raise DataError(config.eval_prompts or config.prompts, str(e)) from None
        monitor = sampled_monitor(config, tokenizer, eval_ids, ref)
    callbacks = [*callbacks, *([monitor] if monitor else [])]

    # Nothing above touched the disk: from here on the run is valid and may write its directory.
    return run_sampled(config, accelerator, lambda out: OnlineTrainer(
        config, accelerator, policy, ref, tokenizer, oracle, prompt_ids, prompt_texts, out, impl=impl,
        callbacks=callbacks))
