"""``chipo online``: online preference optimization -- online DPO / chiPO, XPO and Nash-MD -- on ``accelerate``.

Each step takes ``prompts_per_step`` prompts (a seeded permutation per pass over the data), samples two responses
per prompt, asks the judge which is better (one label per pair) and takes one AdamW step:

* pairwise losses (``loss=dpo|chipo|ipo|...``): y_a, y_b ~ pi (online DPO / chiPO), or with ``exploration=xpo``
  y_a ~ pi, y_b ~ pi_ref plus XPO's bonus alpha * log pi(y_b) (``chipo.losses.online``); the labelled pair goes
  through ``chipo.losses.preference_loss`` with every option of the offline trainer. Ties and items without a
  verdict contribute no preference term.
* ``loss=nash-md``: y_a ~ pi, y_b ~ pi^(1-m) pi_ref^m (token-level geometric mixture), Nash-MD-PG's loss on y_a.

Each method is one record of ``chipo.train.online_methods`` (where y_b comes from, the loss of the judged pair, the
terms added to it, its config checks); the trainer runs any of them with the same step.

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
from chipo.divergences import CHI2, KL
from chipo.generation import decode_response, encode_prompts
from chipo.judges import OpenAIJudgeConfig, PairwisePrompt, build_judge
from chipo.judges.prompt import TLDR_PROMPT
from chipo.losses.online import preference_probability, sample_labels
from chipo.models import load_causal_lm, load_tokenizer, pad_id
from chipo.rewards import load_scorer
from chipo.sequences import batch_sequence_logps, choose_logprobs_impl, packing_supported, response_batch
from chipo.train.common import check_output_dir
from chipo.train.loop import prompt_order
from chipo.train.monitor_callback import sampled_monitor
from chipo.train.online_config import OnlineConfig
from chipo.train.online_methods import JudgedBatch
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
        self.method = config.method
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
        opts = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad)
        a, b = self._sample_pair(p_ids, keys, opts)
        decode = lambda rows: [decode_response(self.tokenizer, ids, done) for ids, done in rows]  # noqa: E731
        prob = self.oracle.probabilities(texts, decode(a), decode(b)).to(acc.device)
        if self.oracle.samples_labels and self.method.pairwise:
            u = uniforms(torch.tensor([as_int64(k) for k in keys[2]], device=acc.device), 0, 1)[:, 0]
            label = sample_labels(prob, u)
        else:
            label = prob
        return Pairs(p_ids, a, b, prob, label)

    def _sample_pair(self, p_ids, keys, opts):
        """y_a ~ pi and y_b from the method's opponent (``chipo.train.online_methods.OPPONENTS``), each row with the
        random stream of its key."""
        policy, opponent = self.policy, self.method.opponent
        if opponent == "policy":  # both from pi: one sampling loop over twice the rows
            both = sample(policy, None, p_ids + p_ids, keys[0] + keys[1], **opts)
            return both[:len(p_ids)], both[len(p_ids):]
        a = sample(policy, None, p_ids, keys[0], **opts)
        if opponent == "ref":
            return a, sample(self.ref, None, p_ids, keys[1], **opts)
        return a, sample(policy, self.ref, p_ids, keys[1], mixture_coef=self.config.mixture_coef, **opts)

    def micro_loss(self, pairs: Pairs, part: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, device, method = self.config, self.accelerator.device, self.method
        p_ids, a, b = pairs.prompt_ids[part], pairs.a[part], pairs.b[part]
        self.model.train()
        n = len(p_ids)
        rows = [ids for ids, _ in a] + ([ids for ids, _ in b] if method.pairwise else [])
        logps = self._logps(self.model, p_ids * (len(rows) // n), rows)
        with torch.no_grad():
            ref_logps = self._logps(self.ref, p_ids * (len(rows) // n), rows)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.float32, device=device)
        batch = JudgedBatch(logps, ref_logps, lengths, pairs.prob[part], pairs.label[part], n,
                            policy_rows=method.policy_rows(n))
        losses, kept, columns = method.losses(cfg, batch)
        log_ratio = (logps - ref_logps).detach()[:batch.policy_rows].double().view(-1, n)
        weight = torch.exp(torch.clamp(-log_ratio, max=cfg.exp_clamp))
        columns.update({
            "kept": kept.float(), "labels/missing": torch.isnan(batch.prob).float(),
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
