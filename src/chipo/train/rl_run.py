"""The ``chipo rl`` recipe: config -> prompts, rewards, models -> ``Accelerator`` -> ``RLTrainer`` -> HF policy.

Everything that can fail on bad input (config, tokenizer, prompts, rewards, models, output directory, the split of
the batch over processes) is checked before the output directory is touched, so a rejected run writes nothing.

Checkpoints are ``accelerate`` states (``save_state``: policy, optimizer, RNG states of every process, the
learning-rate scheduler) plus the step, in ``output_dir/checkpoint-<step>``, written atomically by
``chipo.train.loop`` (the loop is ``chipo.train.sampled``, shared with ``chipo online``): a run killed mid-save
(even with SIGKILL) leaves no ``checkpoint-*`` directory that ``resume_from_checkpoint=latest`` could pick
half-written. Older checkpoints beyond
``save_total_limit`` are then removed, oldest first.
Sampling and prompt order depend only on (seed, step, position), so a resumed run retraces the uninterrupted one;
the run directory follows ``chipo.train.rundir.open_run`` (lock, overwrite, complete checkpoint, objective check,
metrics cut back to the checkpoint's step, a finished run resumed to nothing).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from chipo.config import ConfigError
from chipo.data.prompts import load_prompts
from chipo.models import load_causal_lm, load_tokenizer, pad_id
from chipo.rewards import load_scorer, score_checked
from chipo.sequences import choose_logprobs_impl, response_batch
from chipo.train.common import check_output_dir
from chipo.train.monitor_callback import sampled_monitor
from chipo.train.rl import PromptSet, RLTrainer
from chipo.train.rl_config import RLConfig
from chipo.train.sampled import check_split, make_accelerator, run_sampled

logger = logging.getLogger("chipo")


def _prompt_set(tokenizer, source: str, split: str, limit: int | None, max_prompt_length: int | None) -> PromptSet:
    return PromptSet(tokenizer, load_prompts(source, split, limit).prompts, source, max_prompt_length)


def _accelerator(config: RLConfig):
    return make_accelerator(config, "chipo rl")


def run_rl(config: RLConfig, eval_callback=None, callbacks=()) -> Path:
    """Run ``chipo rl``: validate everything, then train; returns the output directory with the final policy.
    ``callbacks``: ``transformers.TrainerCallback``s (``chipo.train.sampled``)."""
    acc = _accelerator(config)
    check_split(config, acc)
    tokenizer = load_tokenizer(config.tokenizer or config.policy)
    prompts = _prompt_set(tokenizer, config.prompts, config.prompts_split, config.max_prompts,
                          config.max_prompt_length)
    eval_prompts = None
    if config.every("eval"):
        source = config.eval_prompts or config.prompts
        eval_prompts = _prompt_set(tokenizer, source, config.eval_split, config.max_eval_prompts,
                                   config.max_prompt_length)
    reward = load_scorer(config.reward, device=acc.device)
    gold = load_scorer(config.gold, device=acc.device) if config.gold else None
    for name, scorer in (("reward", reward), ("gold", gold)):
        if scorer is not None:
            try:  # pre-flight: a broken reward fails here, before the output directory exists
                score_checked(scorer, prompts.texts[:1], ["test"])
            except Exception as e:  # noqa: BLE001 -- any failure of user code becomes one config error line
                raise ConfigError(f"{name} {getattr(scorer, 'name', '')} failed on a test pair: {e}") from None
    check_output_dir(config)
    torch.manual_seed(config.seed)
    policy = load_causal_lm(config.policy)  # on resume, load_state then restores the trained weights
    ref = load_causal_lm(config.ref_model or config.policy)  # pi_ref: the *initial* policy, also on resume
    pad = pad_id(tokenizer)
    probe = {k: v.to(acc.device) for k, v in response_batch(prompts.ids[:2], [[tokenizer.eos_token_id]] * 2,
                                                            pad).items()}
    impl = choose_logprobs_impl(policy.to(acc.device).eval(), probe, config.logprobs_impl)

    # Nothing above touched the disk: from here on the run is valid and may write its directory.
    monitor = sampled_monitor(config, tokenizer, eval_prompts.ids if eval_prompts else None, ref)
    callbacks = [*callbacks, *([monitor] if monitor else [])]
    return run_sampled(config, acc, lambda out: RLTrainer(
        config, acc, policy, ref, tokenizer, reward, prompts, out, eval_prompts=eval_prompts, gold=gold,
        eval_callback=eval_callback, impl=impl, callbacks=callbacks))
