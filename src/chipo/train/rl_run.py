"""The ``chipo rl`` recipe: config -> prompts, rewards, models -> ``Accelerator`` -> ``RLTrainer`` -> HF policy.

Everything that can fail on bad input (config, tokenizer, prompts, rewards, models, output directory, the split of
the batch over processes) is checked before the output directory is touched, so a rejected run writes nothing.

Checkpoints are ``accelerate`` states (``save_state``: policy, optimizer, RNG states of every process, the
learning-rate scheduler) plus the step, in ``output_dir/checkpoint-<step>``, written atomically by
``chipo.train.loop`` (shared with ``chipo online``): a run killed mid-save (even with SIGKILL) leaves no
``checkpoint-*`` directory that ``resume_from_checkpoint=latest`` could pick half-written. Older checkpoints beyond
``save_total_limit`` are then removed, oldest first.
Sampling and prompt order depend only on (seed, step, position), so a resumed run retraces the uninterrupted one;
on resume, metrics.jsonl lines past the checkpoint's step (logged by the interrupted run) are dropped.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from chipo.config import ConfigError, dump_yaml
from chipo.data.prompts import load_prompts
from chipo.io import atomic_write_text, staged_into
from chipo.models import load_causal_lm, load_tokenizer
from chipo.rewards import load_scorer, score_checked
from chipo.sequences import choose_logprobs_impl, response_batch
from chipo.train import loop
from chipo.train.common import check_output_dir
from chipo.train.rl import PromptSet, RLTrainer
from chipo.train.rl_config import RLConfig

logger = logging.getLogger("chipo")



def save_checkpoint(trainer: RLTrainer) -> Path:
    """``checkpoint-<step>`` of the RL run (``chipo.train.loop.save_checkpoint``)."""
    return loop.save_checkpoint(trainer.accelerator, trainer.out, trainer.step, {}, trainer.config.save_total_limit)


def load_checkpoint(trainer: RLTrainer, checkpoint: Path) -> None:
    """Restore policy, optimizer, scheduler, RNG states and the step; drop metric lines logged after it."""
    trainer.step = int(loop.load_checkpoint(trainer.accelerator, checkpoint, Path(trainer.out) / "metrics.jsonl")
                       ["step"])


def _prompt_set(tokenizer, source: str, split: str, limit: int | None, max_prompt_length: int | None) -> PromptSet:
    return PromptSet(tokenizer, load_prompts(source, split, limit).prompts, source, max_prompt_length)


def _accelerator(config: RLConfig):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    config.device  # noqa: B018 -- TrainingArguments sets up the (possibly distributed) state it describes
    project = ProjectConfiguration(project_dir=config.output_dir, automatic_checkpoint_naming=False,
                                   total_limit=config.save_total_limit)
    mixed = "bf16" if config.bf16 else "fp16" if config.fp16 else None
    trackers = None if config.report_to in ("none", [], None) else config.report_to
    return Accelerator(cpu=config.use_cpu, mixed_precision=mixed, log_with=trackers, project_config=project,
                       gradient_accumulation_plugin=GradientAccumulationPlugin(
                           num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False))


def _check_unsharded(acc) -> None:
    """Sampling calls HF generate on each process's full copy of the policy: parameter sharding is refused."""
    from accelerate.utils import DistributedType

    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if acc.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3):
        raise ConfigError("chipo rl samples with HF generate from the full policy on every process: launch it with "
                          "DDP or DeepSpeed ZeRO-1/2 (FSDP and ZeRO-3 shard the parameters)")


def _warn_dropout_with_checkpointing(model) -> None:
    rates = {k: v for k, v in model.config.to_dict().items() if "dropout" in k and isinstance(v, float) and v > 0}
    if rates:
        logger.warning("gradient_checkpointing keeps checkpointed layers in training mode; layers that apply "
                       "dropout themselves would drop out in the loss forward (config: %s)", rates)


def run_rl(config: RLConfig, eval_callback=None) -> Path:
    """Run ``chipo rl``: validate everything, then train; returns the output directory with the final policy."""
    acc = _accelerator(config)
    _check_unsharded(acc)
    share = acc.num_processes * config.gradient_accumulation_steps
    if config.prompts_per_step % share:
        raise ConfigError(f"prompts_per_step ({config.prompts_per_step}) must be divisible by num_processes x "
                          f"gradient_accumulation_steps ({acc.num_processes} x {config.gradient_accumulation_steps})")
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
    out = check_output_dir(config)
    resume = loop.resolve_resume(config.resume_from_checkpoint, out, "rl")
    torch.manual_seed(config.seed)
    policy = load_causal_lm(config.policy)  # on resume, load_state then restores the trained weights
    ref = load_causal_lm(config.ref_model or config.policy)  # pi_ref: the *initial* policy, also on resume
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs)
        _warn_dropout_with_checkpointing(policy)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    probe = {k: v.to(acc.device) for k, v in response_batch(prompts.ids[:2], [[tokenizer.eos_token_id]] * 2,
                                                            pad).items()}
    impl = choose_logprobs_impl(policy.to(acc.device).eval(), probe, config.logprobs_impl)

    # Nothing above touched the disk: from here on the run is valid and may write its directory.
    if acc.is_main_process:
        if config.overwrite_output_dir and resume is None and out.is_dir():
            for old in [*out.glob("checkpoint-*"), *out.glob(".checkpoint-*"), out / "metrics.jsonl"]:
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        for stale in out.glob(".checkpoint-*"):  # saves cut short by a kill
            shutil.rmtree(stale, ignore_errors=True)
        atomic_write_text(out / "run_config.yaml", dump_yaml(config))
    acc.wait_for_everyone()
    if config.report_to not in ("none", [], None):
        acc.init_trackers(Path(config.output_dir).name or "chipo-rl", config={
            k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))})
    trainer = RLTrainer(config, acc, policy, ref, tokenizer, reward, prompts, out, eval_prompts=eval_prompts,
                        gold=gold, eval_callback=eval_callback, impl=impl)
    if resume is not None:
        load_checkpoint(trainer, resume)
        logger.info("resumed from %s at step %d", resume, trainer.step)
    trainer.train(checkpoint=save_checkpoint)
    acc.wait_for_everyone()
    if acc.is_main_process:
        with staged_into(out) as tmp:  # the final HF policy + tokenizer, renamed into output_dir
            trainer.policy.save_pretrained(tmp, state_dict=acc.get_state_dict(trainer.model))
            tokenizer.save_pretrained(tmp)
    else:
        acc.get_state_dict(trainer.model)  # a collective under ZeRO-3 / FSDP: every process takes part
    acc.end_training()
    return out
