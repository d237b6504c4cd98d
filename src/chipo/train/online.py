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
1e-5): each process's loss is its sum over pairs x (processes / prompts_per_step), and DDP averages the gradients.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from chipo.config import ConfigError, dump_yaml
from chipo.data import DataError
from chipo.data.prompts import load_prompts
from chipo.divergences import CHI2, KL, get_divergence
from chipo.generation import decode_response, encode_prompts
from chipo.io import atomic_write_text, staged_into
from chipo.judges import OpenAIChatJudge, OpenAIJudgeConfig, PairwisePrompt
from chipo.judges.prompt import TLDR_PROMPT
from chipo.losses import preference_loss
from chipo.losses.online import nash_md_loss, policy_penalty, preference_probability, sample_labels, xpo_bonus
from chipo.models import load_causal_lm, load_tokenizer
from chipo.rewards import load_scorer, score_checked
from chipo.sequences import batch_sequence_logps, choose_logprobs_impl, packing_supported, response_batch
from chipo.train import loop
from chipo.train.common import check_output_dir
from chipo.train.loop import optimizer_and_scheduler, prompt_order
from chipo.train.online_config import OnlineConfig
from chipo.train.online_sampling import as_int64, sample, stream_key, uniforms
from chipo.train.pairwise import NonFiniteError
from chipo.train.rundir import checkpoint_note

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
            judge_config = OpenAIJudgeConfig(base_url=config.judge_base_url, model=config.judge_model,
                                             cache=config.judge_cache, max_concurrency=config.judge_max_concurrency,
                                             max_attempts=config.judge_max_attempts, seed=config.seed)
            prompt = GENERAL_PROMPT if config.judge_prompt == "general" else TLDR_PROMPT
            self.judge = OpenAIChatJudge(judge_config, prompt=prompt)
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
        try:
            scores = score_checked(self.scorer, prompts + prompts, a + b)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"judge {self.name} failed: {e}") from None
        scores = torch.from_numpy(scores)
        return preference_probability(scores[:len(a)], scores[len(a):], self.mode)


# ------------------------------------------------------------------------------------------------- the trainer



class OnlineTrainer:
    """The online loop (module docstring) on an ``accelerate.Accelerator``: DDP through ``accelerate launch``.

    Prompt order, sampling and labels are functions of (seed, step, prompt position) only, and checkpoints hold the
    accelerate state (policy, optimizer, RNG) plus the step and the labels spent, so a resumed run retraces the
    uninterrupted one.
    """

    def __init__(self, config: OnlineConfig, accelerator, policy, ref, tokenizer, oracle: PreferenceOracle,
                 prompt_ids: list[list[int]], prompt_texts: list[str], out: Path):
        self.config, self.accelerator, self.tokenizer, self.oracle = config, accelerator, tokenizer, oracle
        self.prompt_ids, self.prompt_texts, self.out = prompt_ids, prompt_texts, Path(out)
        self.ref = ref.to(accelerator.device).eval().requires_grad_(False)
        optimizer, self.scheduler = optimizer_and_scheduler(config, policy, config.max_steps)
        self.policy, self.optimizer = accelerator.prepare(policy, optimizer)
        accelerator.register_for_checkpointing(self.scheduler)
        self.divergence = get_divergence(config.regularizer or "kl")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.impl, self.step, self.labels = "logits", 0, 0

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

    # --- one step
    def train_step(self, step: int) -> dict[str, float]:
        cfg, acc = self.config, self.accelerator
        index = self.batch_indices(step)
        local = list(self._local_positions())
        p_ids = [self.prompt_ids[index[j]] for j in local]
        texts = [self.prompt_texts[index[j]] for j in local]
        keys = [[stream_key(cfg.seed, step, j, s) for j in local] for s in range(3)]
        policy = acc.unwrap_model(self.policy)
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
        missing = torch.isnan(prob)

        self.policy.train()
        n = len(local)
        rows = [ids for ids, _ in a] + ([] if cfg.nash_md else [ids for ids, _ in b])
        logps = self._logps(self.policy, p_ids * (len(rows) // n), rows)
        with torch.no_grad():
            ref_logps = self._logps(self.ref, p_ids * (len(rows) // n), rows)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.float32, device=acc.device)
        policy_samples = slice(0, n) if cfg.nash_md or cfg.exploration == "xpo" else slice(0, 2 * n)
        columns: dict[str, torch.Tensor] = {}
        if cfg.nash_md:
            losses, metrics = nash_md_loss(logps, ref_logps, torch.where(missing, 0.5, prob), beta=cfg.beta,
                                           divergence=self.divergence, exp_clamp=cfg.exp_clamp)
            kept = ~missing
            columns.update({k: metrics[k] for k in ("loss/score", "loss/kl", "rewards/probabilities",
                                                    "logps/chosen")})
        else:
            if self.oracle.samples_labels:
                u = uniforms(torch.tensor([as_int64(k) for k in keys[2]], device=acc.device), 0, 1)[:, 0]
                label = sample_labels(prob, u)
            else:
                label = prob
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
            "loss": losses.detach(), "kept": kept.float(), "labels/missing": missing.float(),
            "kl": (KL.f(log_ratio, cfg.exp_clamp) * weight).mean(0), "kl_k1": log_ratio.mean(0),
            "chi2": (CHI2.f(log_ratio, cfg.exp_clamp) * weight).mean(0),
            "response_length": torch.tensor([float(len(ids) - done) for ids, done in a], device=acc.device),
        })
        # Each process holds n of the step's P pairs; DDP averages over processes: sum * W / P is the global mean.
        acc.backward(losses.sum() * acc.num_processes / cfg.prompts_per_step)
        bad = acc.reduce(torch.tensor([float(not torch.isfinite(losses).all())], device=acc.device), "sum")
        if bad.item():
            raise NonFiniteError(f"non-finite online loss at step {step + 1}; stopping before the optimizer step, "
                                 f"{checkpoint_note(self.out)}")
        grad_norm = acc.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm or float("inf"))
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            raise NonFiniteError(f"non-finite gradient at step {step + 1}; stopping before the optimizer step, "
                                 f"{checkpoint_note(self.out)}")
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.labels += cfg.prompts_per_step
        return {**self._reduce(columns, float(grad_norm)), "learning_rate": learning_rate}

    def _reduce(self, columns: dict[str, torch.Tensor], grad_norm: float) -> dict[str, float]:
        """Means over the step's pairs on all processes: pair metrics over labelled pairs, the rest over all."""
        names = list(columns)
        table = self.accelerator.gather(torch.stack([columns[k].double() for k in names], 1))
        values = dict(zip(names, table.T))
        kept = values.pop("kept").bool()
        per_pair = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                    "logps/rejected", "clipped", "loss/preference", "loss/score", "rewards/probabilities"}
        record = {}
        for name, column in values.items():
            if name.startswith("labels/"):
                record[name] = float(column.sum())
            elif name in per_pair:
                record[name] = float(column[kept].mean()) if kept.any() else math.nan
            else:
                record[name] = float(column.mean())
        record.update({"labels/step": float(len(kept)), "labels": self.labels, "grad_norm": grad_norm})
        return record

    # --- checkpoints
    def save_checkpoint(self, step: int) -> Path:
        """accelerate state + step + labels spent in ``checkpoint-<step>`` (``chipo.train.loop``)."""
        return loop.save_checkpoint(self.accelerator, self.out, step, {"labels": self.labels},
                                    self.config.save_total_limit)

    def load_state(self, checkpoint: Path) -> None:
        state = loop.load_checkpoint(self.accelerator, checkpoint, self.out / "metrics.jsonl")
        self.step, self.labels = int(state["step"]), int(state["labels"])

    # --- the loop
    def train(self) -> None:
        cfg, acc = self.config, self.accelerator
        probe = response_batch(self.prompt_ids[:2], [[self.tokenizer.eos_token_id]] * 2, self.pad)
        self.impl = choose_logprobs_impl(acc.unwrap_model(self.policy),
                                         {k: v.to(acc.device) for k, v in probe.items()}, cfg.logprobs_impl)
        last = cfg.max_steps
        if cfg.max_labels is not None:
            last = min(last, cfg.max_labels // cfg.prompts_per_step)
            if last < cfg.max_steps:
                logger.info("label budget max_labels=%d allows %d steps", cfg.max_labels, last)
        bar = tqdm(range(self.step, last), initial=self.step, total=last, desc="chipo online", unit="step",
                   disable=bool(cfg.disable_tqdm) or not acc.is_main_process)
        for step in bar:
            record = self.train_step(step)
            self.step = step + 1
            record = {"step": self.step, **record}
            if acc.is_main_process and (self.step % cfg.every("logging") == 0 or self.step == last):
                line = json.dumps(record)
                with (self.out / "metrics.jsonl").open("a") as f:
                    f.write(line + "\n")
                tqdm.write(line, file=sys.stdout)
            bar.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.3f}", labels=self.labels)
            if cfg.every("save") and (self.step % cfg.every("save") == 0 or self.step == last):
                self.save_checkpoint(self.step)

    def save_final(self) -> None:
        """The final HF policy + tokenizer in ``output_dir`` (staged in a hidden directory, then moved in)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with staged_into(self.out) as tmp:
                self.accelerator.unwrap_model(self.policy).save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
        self.accelerator.wait_for_everyone()


def run_online(config: OnlineConfig) -> Path:
    """Run ``chipo online``: validate everything, then train; returns the output directory with the final policy."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.accelerate_precision())
    if config.prompts_per_step % accelerator.num_processes:
        raise ConfigError(f"prompts_per_step={config.prompts_per_step} must be a multiple of the number of "
                          f"processes ({accelerator.num_processes})")
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
    out = check_output_dir(config)
    resume = loop.resolve_resume(config.resume_from_checkpoint, out, "online")
    torch.manual_seed(config.seed)
    policy = load_causal_lm(config.policy)
    ref = load_causal_lm(config.ref_model or config.policy)  # pi_ref: the initial policy, also on resume
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "run_config.yaml", dump_yaml(config))
    accelerator.wait_for_everyone()
    trainer = OnlineTrainer(config, accelerator, policy, ref, tokenizer, oracle, prompt_ids, prompt_texts, out)
    if resume is not None:
        trainer.load_state(resume)
        logger.info("resumed from %s at step %d (%d labels spent)", resume, trainer.step, trainer.labels)
    trainer.train()
    trainer.save_final()
    return out
