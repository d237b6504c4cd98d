"""Pieces of the ``accelerate`` loop (``chipo.train.sampled``) of ``chipo rl`` and ``chipo online``: the optimizer
and schedule, the prompt order, checkpoints written atomically with ``save_state``, and their loading.

Both sample from the current policy, so they are not ``transformers.Trainer`` runs; they still get DDP / DeepSpeed
from ``accelerate launch``. A checkpoint is ``checkpoint-<step>``: every process writes its part of the
accelerate state into a hidden directory, the main process adds ``loop_state.json`` (the step and what else the
loop needs) and renames it into place, so a kill during a save never leaves a checkpoint that ``latest`` picks.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

from chipo.config import ConfigError
from chipo.io import read_json, write_json
from chipo.train.rundir import LOOP_STATE, loop_checkpoints


def interval(value: float | None, max_steps: int) -> int:
    """A TrainingArguments step interval as an integer: values below 1 are a fraction of ``max_steps``; 0: never."""
    if not value:
        return 0
    return max(1, math.ceil(value * max_steps)) if value < 1 else int(value)


def optimizer_and_scheduler(args, policy, num_training_steps: int):
    """The optimizer and learning-rate schedule ``transformers.Trainer`` would build from ``args`` (``optim``,
    ``adam_*``, ``weight_decay`` on matrices only, ``lr_scheduler_type``, warm-up), for a hand-written loop."""
    from transformers import Trainer, get_scheduler

    try:
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, policy)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"optim {args.optim}: {e}") from None
    # Weight decay on matrices only (not on biases and norm gains), as transformers.Trainer does.
    params = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.get_warmup_steps(num_training_steps),
                              num_training_steps=num_training_steps,
                              scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
    return optimizer, scheduler


def prompt_order(n: int, size: int, seed: int, step: int) -> list[int]:
    """Prompt indices of step ``step``'s global batch of ``size``: consecutive slices of one seeded permutation of
    the ``n`` prompts per pass, so the order depends only on (seed, step) and a resumed run retraces it."""
    out = []
    for position in range(step * size, (step + 1) * size):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(order[offset]))
    return out


def save_checkpoint(accelerator, out: str | os.PathLike, step: int, state: dict, total_limit: int | None) -> Path:
    """``checkpoint-<step>`` (accelerate state + ``state``), atomically; keeps the newest ``total_limit``."""
    out = Path(out)
    final, partial = out / f"checkpoint-{step}", out / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(partial / LOOP_STATE, {**state, "step": step, "num_processes": accelerator.num_processes})
        if final.exists():  # a rerun of this step: the old one goes only once the new one is complete
            old = out / f".checkpoint-{step}.old"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(partial, final)
        if total_limit:
            for stale in loop_checkpoints(out)[:-total_limit]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: str | os.PathLike) -> dict:
    """Restore the accelerate state; returns the saved loop state (the run directory protocol,
    ``chipo.train.rundir.open_run``, has already cut ``metrics.jsonl`` back to its step)."""
    accelerator.load_state(str(checkpoint))
    return read_json(Path(checkpoint) / LOOP_STATE) or {}
