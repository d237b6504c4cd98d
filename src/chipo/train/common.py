"""What every chipo command built on ``transformers.Trainer`` shares: its config base, the set-up of TRL's trainer
arguments (``TrainerConfig.from_args``, ``load_policy`` for a model given by name, ``trainer_datasets`` for raw or
prepared rows), and its run under the run-directory protocol (``run_trainer``, on ``chipo.train.rundir.open_run``).

``TrainerConfig`` is a ``transformers.TrainingArguments`` subclass (as TRL's ``DPOConfig`` is): every
TrainingArguments option (``torch_compile``, ``adam_beta2``, ``lr_scheduler_kwargs``, ``push_to_hub``, ``fsdp``,
``deepspeed``, ...) is a config key, and the config object *is* the Trainer's ``args``. It adds the data and
sequence fields that ``chipo train``, ``chipo sft`` and ``chipo reward`` spell and validate identically, refuses
the TrainingArguments keys its trainer would ignore (``chipo.train.honoured``), and changes a few defaults to
chipo's (each command's config subclasses it and may redeclare a field to change its default or help; a redeclared
field keeps its place).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from transformers import TrainingArguments

from chipo.config import ConfigError, _field, dump_yaml
from chipo.io import atomic_write_text, move_contents
from chipo.models import from_pretrained_kwargs, load_causal_lm, model_name
from chipo.train import rundir
from chipo.train.honoured import PAIRWISE_HONOURED, TRAINING_ARGUMENTS, help_keys, refuse_unread
from chipo.train.rundir import check_output_path

logger = logging.getLogger("chipo")

# report_to name -> the packages that provide it (torch.utils.tensorboard needs `tensorboard`; tensorboardX also works
# for transformers' callback); checked when a run starts (``check_trackers``), so a missing one is one line, not a
# traceback. (Not when the config is built: a config may be written on a machine other than the one that runs it.)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                    "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",),
                    "swanlab": ("swanlab",), "trackio": ("trackio",), "neptune": ("neptune",),
                    "codecarbon": ("codecarbon",), "dagshub": ("dagshub",), "flyte": ("flytekit",)}
REPORTERS = ("none", "all", "tensorboard", "wandb", "mlflow", "comet_ml", "neptune", "clearml", "dvclive", "trackio",
             "swanlab", "codecarbon", "azure_ml", "dagshub", "flyte")


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def check_common_arguments(args: TrainingArguments) -> None:
    """Checks every chipo config shares, before TrainingArguments validates itself: the range of ``seed``, one mixed
    precision, known loggers (``report_to`` as a comma-separated string too)."""
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"seed must lie in [0, 2**32), got {args.seed}")
    if args.bf16 and args.fp16:
        raise ConfigError("choose at most one of bf16 and fp16")
    if isinstance(args.report_to, str):
        args.report_to = [r.strip() for r in args.report_to.split(",") if r.strip()] or ["none"]
    unknown = [r for r in (args.report_to or []) if r not in REPORTERS]
    if unknown:
        raise ConfigError(f"report_to: unknown logger {unknown[0]!r}; valid: {', '.join(REPORTERS)}")
    if args.report_to == ["none"]:
        args.report_to = "none"


def finish_training_arguments(args: TrainingArguments, base: type) -> None:
    """CPU-only machines get ``use_cpu`` (so ``accelerate launch`` sets up gloo DDP) and no pinned memory; then
    ``base.__post_init__`` (TrainingArguments) runs, its errors as one-line ``ConfigError``s."""
    if not _has_accelerator():
        args.use_cpu = True
    args.dataloader_pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
    try:
        base.__post_init__(args)
    except ConfigError:
        raise
    except (ValueError, TypeError, ImportError) as e:
        raise ConfigError(" ".join(str(e).split())) from None


@dataclass
class TrainerConfig(TrainingArguments):
    """Fields shared by the Trainer-based commands (see the subclasses for what ``dataset`` holds)."""

    honoured: ClassVar[frozenset[str]] = PAIRWISE_HONOURED
    """TrainingArguments keys the command's trainer reads; others are refused when set (``chipo.train.honoured``)."""
    command: ClassVar[str] = "chipo train"
    # Read a JSON string for model_init_kwargs too (``--model_init_kwargs '{"dtype": "bfloat16"}'``), as TRL does.
    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs"]

    model: str = _field(None, "Model to train: a hub model name or a local HF directory.")
    dataset: str = _field(None, "Training data: hub dataset name, local .json/.jsonl/.parquet/.arrow file, or a "
                                "directory saved by datasets.")
    output_dir: str = _field("outputs/chipo-run", "Where checkpoints, the final HF model, run_config.yaml and "
                                                  "metrics.jsonl go.")
    overwrite_output_dir: bool = _field(False, "Start over in a non-empty output_dir: its previous run (checkpoints, "
                                               "metrics) is removed first. Otherwise a non-empty output_dir is an "
                                               "error unless resuming.")
    split: str = _field("train", "Training split of `dataset`.")
    eval_dataset: str | None = _field(None, "Evaluation data (same forms as `dataset`); default: `dataset`.")
    eval_split: str | None = _field(None, "Evaluation split of `eval_dataset` (or of `dataset`); null: no evaluation, "
                                          "unless `eval_dataset` is set (then its only split).")
    max_train_samples: int | None = _field(None, "Use only the first N training rows (debugging, demos).")
    tokenizer: str | None = _field(None, "Tokenizer name or path; default: `model`.")
    max_length: int = _field(512, "Max tokens of prompt + response; responses are cut to fit.")
    max_prompt_length: int | None = _field(None, "Max prompt tokens; longer prompts keep their last tokens.")
    num_proc: int | None = _field(None, "Processes for dataset tokenisation.")
    group_by_length: bool = _field(False, "Batch rows of similar length together (less padding; changes the "
                                          "sample order beyond plain shuffling, so off by default).")
    warmup_ratio: float | None = _field(None, "Fraction of steps of linear warm-up, in [0, 1) (sets warmup_steps, "
                                              "which in transformers 5 takes a ratio below 1).")
    # Loading a model given by name, as TRL's trainer configs (DPOConfig, SFTConfig, RewardConfig) do.
    # dict | str | None, in that order (TRL's): HfArgumentParser reads it as str, a JSON object.
    model_init_kwargs: dict | str | None = _field(None, "Keyword arguments for from_pretrained when the model is "
                                                        "given by name (dtype, attn_implementation, revision, ...), "
                                                        "as TRL's model_init_kwargs (a model passed already loaded "
                                                        "is used as it is).")
    trust_remote_code: bool = _field(False, "Allow models and tokenizers that ship their own Python code (passed to "
                                            "from_pretrained), as in TRL's trainer configs.")
    # TrainingArguments fields with chipo's defaults
    learning_rate: float = _field(1e-5, "Peak learning rate.")
    logging_steps: float = _field(10, "Log metrics every N optimizer steps.")
    logging_first_step: bool = _field(True, "Log the first step too.")
    save_strategy: str = _field("epoch", "When to save checkpoints: epoch, steps or no.")
    # None first: HfArgumentParser (TRL's TrlParser) then reads it as str; str | list[str] | None crashes it
    report_to: None | str | list[str] = _field("none", "Loggers: none, tensorboard, wandb, ... (comma-separated).")
    remove_unused_columns: bool = _field(False, "Keep dataset columns (chipo's collators choose what they need).")
    resume_from_checkpoint: str | None = _field(None, "'latest' or a checkpoint directory to resume from.")

    def require_model_and_data(self) -> None:
        """The command-line runs read both from the config (the Python API may pass objects instead)."""
        if not self.model:
            raise ConfigError("model is required (a hub name or a local directory)")
        if not self.dataset:
            raise ConfigError("dataset is required (a hub name or a local file/directory)")

    @classmethod
    def from_args(cls, args: TrainingArguments | None, model=None, suffix: str = "run"):
        """A trainer's ``args`` as TRL's SFTTrainer / RewardTrainer take them: this config as it is; a plain
        ``TrainingArguments`` turned into this config (its values kept, this config's own fields at their
        defaults); None: the defaults with ``output_dir`` '<model name>-<suffix>'."""
        if isinstance(args, cls):
            return args
        if args is None:
            return cls(output_dir=f"{Path(model_name(model) or 'model').name}-{suffix}")
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"args must be a {cls.__name__} or a transformers.TrainingArguments, "
                            f"got {type(args).__name__}")
        values = {**args.to_dict(), "hub_token": args.hub_token}  # to_dict hides the token
        return cls(**{k: v for k, v in values.items() if k in TRAINING_ARGUMENTS})

    @classmethod
    def help_keys(cls) -> set[str]:
        return help_keys(cls)

    def __post_init__(self) -> None:
        refuse_unread(self, type(self).honoured, type(self).command)
        if isinstance(self.model_init_kwargs, str) and not self.model_init_kwargs.lstrip().startswith("{"):
            raise ConfigError(f"model_init_kwargs must be a mapping or a JSON object, got {self.model_init_kwargs!r}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"max_prompt_length must lie in (0, max_length={self.max_length}), "
                              f"got {self.max_prompt_length}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise ConfigError(f"eval_steps must be positive, got {self.eval_steps}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("set num_train_epochs > 0 or max_steps > 0")
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise ConfigError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"max_train_samples must be at least 1, got {self.max_train_samples}")
        check_common_arguments(self)
        # chipo's run-level conveniences, mapped onto TrainingArguments before it validates itself.
        if (self.eval_split or self.eval_dataset) and str(self.eval_strategy) in ("no", "IntervalStrategy.NO"):
            self.eval_strategy = "steps" if self.eval_steps else "epoch"
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        finish_training_arguments(self, TrainingArguments)


def load_policy(config: TrainerConfig, name: str | None = None, quantization_config=None):
    """The causal LM ``name`` (default ``config.model``) loaded as TRL's trainers load a model given by name:
    ``from_pretrained`` with ``config.model_init_kwargs``, ``trust_remote_code`` and ``quantization_config``
    (``chipo.models.from_pretrained_kwargs``). ``chipo train`` and ``chipo sft`` and their trainers load here."""
    return load_causal_lm(name or config.model, **from_pretrained_kwargs(
        config.model_init_kwargs, trust_remote_code=config.trust_remote_code, quantization_config=quantization_config))


def trainer_datasets(config: TrainerConfig, train, evaluation, prepare: Callable) -> tuple:
    """A trainer's (train, eval) datasets, given as TRL's trainers take them or named by the config: rows already
    tokenized (a ``prompt_input_ids`` column) as they are; raw rows (a ``datasets.Dataset`` or a list of dicts) by
    ``prepare(rows, source_name)``; None: ``config.dataset[config.split]`` (its first ``max_train_samples`` rows)
    and, when ``eval_split`` or ``eval_dataset`` is set, ``(eval_dataset or dataset)[eval_split]`` (a file without
    eval_split: its only split), loaded and prepared; otherwise None. The main process prepares first (the others
    then read the datasets cache)."""
    from accelerate import PartialState
    from datasets import Dataset

    from chipo.data import load_preference_dataset

    def resolve(rows, name: str, wanted: bool, source: str | None, split: str | None, limit: int | None = None):
        if rows is None:
            return prepare(load_preference_dataset(source, split, max_rows=limit), source) if wanted and source \
                else None
        if "prompt_input_ids" in getattr(rows, "column_names", []):
            return rows
        return prepare(Dataset.from_list(rows) if isinstance(rows, list) else rows, name)

    with PartialState().main_process_first():
        train = resolve(train, "train_dataset", True, config.dataset, config.split, config.max_train_samples)
        evaluation = resolve(evaluation, "eval_dataset", bool(config.eval_split or config.eval_dataset),
                             config.eval_dataset or config.dataset, config.eval_split)
    return train, evaluation


def check_output_dir(config) -> Path:
    """Validate ``output_dir`` before any work: a non-empty one needs ``overwrite_output_dir`` or a resume."""
    out = Path(config.output_dir)
    check_output_path(out)  # not a file, not a dangling symbolic link
    # The lock file of an earlier run is not a run: a directory holding only it counts as empty.
    if out.is_dir() and any(p.name != rundir.LOCK for p in out.iterdir()) \
            and not (config.overwrite_output_dir or config.resume_from_checkpoint):
        raise ConfigError(f"output_dir {out} is not empty; set overwrite_output_dir=true or resume_from_checkpoint")
    if config.resume_from_checkpoint and config.resume_from_checkpoint != "latest" \
            and not Path(config.resume_from_checkpoint).is_dir():
        raise ConfigError(f"resume_from_checkpoint {config.resume_from_checkpoint} is not a directory")
    return out


def save_final_model(trainer, tokenizer, out: Path, merge_lora: bool) -> None:
    """Save an HF-format model (merged weights for LoRA, adapter in ``adapter/``) atomically into ``out``."""
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".final-"))
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if merge_lora:
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        move_contents(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_trackers(config) -> None:
    """One-line ``ConfigError`` for a ``report_to`` tracker whose package is not installed (before any work)."""
    report_to = config.report_to
    for name in [report_to] if isinstance(report_to, str) else report_to or []:
        packages = TRACKER_PACKAGES.get(name)
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise ConfigError(f"report_to={name} needs the {packages[0]!r} package, which is not installed "
                              f"(pip install {packages[0]}), or set report_to=none")


def disk_full(exc: BaseException, out: Path) -> bool:
    """Whether ``exc`` (raised while writing into ``out``) means the disk is full: ENOSPC, or a library's wrapped
    write error (torch's C++ writer, safetensors' "StorageFull") on a disk with (almost) no room left."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    if "No space left" in text or "StorageFull" in text:
        return True
    # torch.save's C++ writer reports a short write in its own words ("file write failed", "iostream error",
    # "unexpected pos"); they mean a full disk only when the disk is (almost) full.
    if any(words in text for words in ("write failed", "failed writing", "iostream error", "unexpected pos")):
        try:
            return shutil.disk_usage(out if out.exists() else out.parent).free < 64 * 2**20
        except OSError:
            return False
    return False


def disk_full_error(out: Path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device while writing the run (the last complete checkpoint "
                                 "is kept; free space, then resume with resume_from_checkpoint=latest)", str(out))


@contextlib.contextmanager
def run_guard(run, out: Path, is_main_process: bool) -> Iterator[None]:
    """The run-directory protocol's exit path, the same for every command: a run that stops before its first step
    in an output_dir it found empty removes it (so the same command can be rerun); an exception that means a full
    disk becomes one ``OSError`` line (``disk_full_error``); the lock is released whatever happened."""
    try:
        yield
    except BaseException as e:
        if is_main_process and run.discard_if_unstarted():
            logger.info("removed %s: the run stopped before its first step", out)
        # An OSError already names its reason and path (one line from the CLI); others that mean a full disk too.
        if isinstance(e, Exception) and not isinstance(e, (ConfigError, OSError)) and disk_full(e, out):
            raise disk_full_error(out) from None
        raise
    finally:
        run.release()


@contextlib.contextmanager
def opened_run(config, out: Path, *, is_main: bool, barrier: Callable[[], None], objective_keys,
               total_steps: int | None = None) -> Iterator[rundir.RunDir | None]:
    """The run-directory protocol's entry, the same for every training command (``run_trainer``,
    ``chipo.train.sampled.run_sampled``): ``rundir.open_run`` by the main process (lock, overwrite clearing,
    newest complete checkpoint for 'latest', objective check, metrics cut back), ``run_config.yaml`` written, and
    ``run_guard``'s exit path around the body. Yields the ``RunDir``, or None for a finished run whose final model
    is saved: nothing to do. ``barrier`` syncs the processes (every process has checked output_dir before the
    main one creates, locks or clears it, and sees it ready before going on)."""
    barrier()
    run = rundir.open_run(out, config, resume=config.resume_from_checkpoint, overwrite=config.overwrite_output_dir,
                          is_main=is_main, objective_keys=objective_keys, total_steps=total_steps)
    barrier()
    with run_guard(run, out, is_main):
        if run.finished and rundir.final_model_saved(out):
            logger.info("%s already reached its last step at %s: nothing to do", out, run.checkpoint)
            yield None
            return
        if is_main:
            atomic_write_text(out / rundir.RUN_CONFIG, dump_yaml(config))
        barrier()
        yield run


def run_trainer(config, out: Path, make_trainer: Callable[[], object], tokenizer, *, merge_lora: bool = False,
                objective_keys=rundir.OBJECTIVE_KEYS, after_train: Callable | None = None) -> Path:
    """Train a ``transformers.Trainer`` built by ``make_trainer()`` in ``out`` under the run-directory protocol
    (``chipo.train.rundir.open_run``: lock, overwrite clearing, newest complete checkpoint for 'latest', refusal of
    a changed objective (``objective_keys``), metrics cut back, a finished run resumed to nothing), then save the
    final model. A run that stops before its first step in an output_dir it found empty leaves nothing behind;
    a full disk is one ``OSError`` line (exit 2) instead of a traceback."""
    from accelerate import PartialState

    state = PartialState()
    with opened_run(config, out, is_main=state.is_main_process, barrier=state.wait_for_everyone,
                    objective_keys=objective_keys) as run:
        if run is None:
            return out
        trainer = make_trainer()
        if run.finished:  # killed while saving the final model: rebuild it from the last checkpoint, do not train
            trainer._load_from_checkpoint(run.checkpoint)
        else:
            trainer.train(resume_from_checkpoint=run.checkpoint)
            if after_train is not None:
                after_train(trainer)
        save_final_model(trainer, tokenizer, out, merge_lora=merge_lora)
        if state.is_main_process:
            run.mark_finished()
    return out
