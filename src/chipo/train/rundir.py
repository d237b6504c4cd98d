"""Run directories that survive kills, reruns and a second run on the same ``output_dir``: the one protocol of every
command that writes a run (``chipo train``, ``sft``, ``reward`` through ``chipo.train.common.run_trainer``;
``chipo rl``, ``online`` through ``chipo.train.sampled.run_sampled``).

A training run owns ``output_dir`` for its lifetime (an exclusive ``fcntl.flock`` on ``output_dir/.lock``). On
start it removes what a killed run left half-done (hidden ``.final-*`` / ``.checkpoint-*`` folders, ``*.tmp``
files), clears the old run when ``overwrite_output_dir`` is set, and, when resuming, picks the newest *complete*
checkpoint (a kill -9 during a save leaves a partial one), refuses one whose objective differs, cuts
``metrics.jsonl`` back to the checkpoint's step (the steps after it will be logged again), and says "nothing to do"
for a finished run instead of training past ``max_steps``. Which config keys define "the objective" is per command
(``objective_keys``). A run that fails before its first step in a directory it found empty removes it again
(``RunDir.discard_if_unstarted``), so the same command can be rerun. Functions here touch only the run directory;
``open_run`` puts them in order.

Directories that hold many runs or results (``chipo lab sweep``, the lab's experiments, the TL;DR recipe's sweep,
generate, judge and report stages) follow the same protocol through ``chipo.train.experiment_dir.open_experiment``,
which reuses the lock, the cleaning and the objective comparison here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import TrainerCallback

from chipo.config import ConfigError, dump_yaml

logger = logging.getLogger("chipo")

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
METRICS = "metrics.jsonl"
RUN_CONFIG = "run_config.yaml"
DONE = ".run-complete.json"
LOCK = ".lock"
LOOP_STATE = "loop_state.json"
"""What ``chipo.train.loop`` writes last into a checkpoint of ``chipo rl`` / ``chipo online``: it marks it complete."""
OBJECTIVE_KEYS = ("model", "ref_model", "dataset", "split", "max_train_samples", "drop_ties", "loss", "beta", "r_max",
                  "clip_margin", "link", "label_smoothing", "alpha", "length_normalize", "sft_weight", "reward_bound",
                  "max_length", "max_prompt_length", "lora", "lora_rank", "lora_scaling_alpha",
                  "lora_modules")
"""run_config.yaml keys that define the optimisation problem (Huang et al. 2024, arXiv 2407.13399: the loss, its
beta, the data and pi_ref/pi_theta): resuming a checkpoint trained on another objective would mix two runs."""
LENGTH_KEYS = ("max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps")
"""Keys that fix the number of optimizer steps; if they are unchanged, a checkpoint at its own max_steps is final."""
# What a chipo run writes into output_dir; overwrite_output_dir removes these and leaves anything else alone.
RUN_FILES = (METRICS, RUN_CONFIG, DONE, "adapter", "config.json", "generation_config.json", "model.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "runs")


# ---------------------------------------------------------------------------------------------------- checkpoints


def _safetensors_whole(path: Path) -> bool:
    """Header parses and the file is as long as the header says (a save cut short fails this)."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def _file_whole(path: Path) -> bool:
    suffix = path.suffix
    if suffix == ".safetensors":
        return _safetensors_whole(path)
    if suffix == ".json":
        try:
            json.loads(path.read_text())
            return True
        except (OSError, ValueError):
            return False
    if suffix in (".pt", ".pth", ".bin"):
        return zipfile.is_zipfile(path)  # torch.save's zip format: the central directory is written last
    return True


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete Trainer checkpoint, or None. Trainer writes ``trainer_state.json`` last, so
    a checkpoint without it (or with a torn one, or with any torn weight/optimizer/json file) was cut by a kill."""
    path = Path(path)
    if (path / LOOP_STATE).is_file():  # chipo.train.loop renames a checkpoint into place once it is whole
        try:
            int(json.loads((path / LOOP_STATE).read_text())["step"])
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return f"{LOOP_STATE} unreadable"
    state = path / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json missing"
    try:
        json.loads(state.read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json unreadable"
    torn = [p.name for p in sorted(path.iterdir()) if p.is_file() and not _file_whole(p)]
    return f"incomplete file(s): {', '.join(torn)}" if torn else None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint-N`` in ``output_dir`` with the largest N that is complete (see ``checkpoint_problem``);
    partial ones are skipped with a warning. None when there is none."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()),
                   reverse=True)
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping partial checkpoint %s (%s; a run was killed while saving it)", path, problem)
    return None


def trainer_state(checkpoint: str | os.PathLike) -> dict:
    """``global_step`` and ``max_steps`` of a checkpoint (Trainer's trainer_state.json, or the accelerate loops'
    loop_state.json)."""
    loop_state = Path(checkpoint) / LOOP_STATE
    if loop_state.is_file():
        state = json.loads(loop_state.read_text())
        return {"global_step": int(state["step"]), "max_steps": int(state.get("max_steps", 0))}
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


# ---------------------------------------------------------------------------------------------------- cleaning


def check_output_path(out: str | os.PathLike, label: str = "output_dir") -> None:
    """One-line ConfigError for an output directory (config key ``label``) that is a dangling symlink or not a
    directory."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"{label} {out} is a symlink to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{label} {out} exists and is not a directory")


def clean_stale(out: str | os.PathLike) -> list[str]:
    """Remove what a killed run left half-written: hidden ``.final-*`` folders (final model being saved),
    ``.checkpoint-*`` folders (an accelerate-loop checkpoint being saved) and ``*.tmp`` files/folders (atomic
    writes). Call only while holding the run lock. Returns the removed names."""
    return remove_entries(e for e in Path(out).iterdir()
                   if e.name.startswith((".final-", ".checkpoint-")) or e.name.endswith(".tmp"))


def clear_run(out: str | os.PathLike) -> list[str]:
    """For overwrite_output_dir: remove the previous run's checkpoints, metrics, config and final model (the
    names in ``RUN_FILES``), so the new run does not append to or mix with it. Other files are left alone."""
    return remove_entries(e for e in Path(out).iterdir()
                   if e.name in RUN_FILES or CHECKPOINT.match(e.name) or e.name.startswith("model-"))


def remove_entries(entries) -> list[str]:
    """Delete files and directories (a symlink is unlinked, never followed); returns their sorted names."""
    removed = []
    for entry in list(entries):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return sorted(removed)


# ---------------------------------------------------------------------------------------------------- metrics


def _open_nofollow(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symlink; refusing to write metrics through it (remove the link)") from None
        raise


def check_metrics_file(path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_symlink():
        raise ConfigError(f"{path} is a symlink; refusing to write metrics through it (remove the link)")


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Keep the records of ``metrics.jsonl`` with ``step <= step`` (a torn last line is dropped); the steps after
    a resumed checkpoint are trained and logged again. Returns the number of records removed."""
    path = Path(path)
    check_metrics_file(path)
    if not path.exists():
        return 0
    kept, removed = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            keep = json.loads(line).get("step", 0) <= step
        except (ValueError, AttributeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            removed += 1
    if removed:
        tmp = path.with_name(f".{path.name}.tmp")
        fd = _open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return removed


class MetricsLog(TrainerCallback):
    """Appends every log event as one JSON line to ``metrics.jsonl`` (main process), never through a symlink."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        fd = _open_nofollow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------- resume


def _saved_config(checkpoint: Path) -> dict | None:
    for where in (checkpoint / RUN_CONFIG, checkpoint.parent / RUN_CONFIG):
        if where.is_file():
            try:
                loaded = yaml.safe_load(where.read_text())
            except yaml.YAMLError:
                return None
            return loaded if isinstance(loaded, dict) else None
    return None


def objective_difference(saved: dict, current: dict, keys=OBJECTIVE_KEYS,
                         where: str = "the checkpoint's run") -> str | None:
    """The first of ``keys`` whose value differs between two run configs (keys in both), as a line; ``where``
    names what ``saved`` came from."""
    for key in keys:
        if key in saved and key in current and saved[key] != current[key]:
            return f"{key} was {saved[key]!r} in {where}, now {current[key]!r}"
    return None


def is_finished(checkpoint: Path, saved: dict | None, current: dict, total_steps: int | None = None) -> bool:
    """True when ``checkpoint`` already reached the end of this run: its step is at least ``total_steps`` when the
    caller knows it (the accelerate loops), else at least max_steps, either the current config's or, when the
    step-count keys are unchanged, the one recorded in the checkpoint."""
    state = trainer_state(checkpoint)
    step = state.get("global_step", 0)
    if total_steps is not None:
        return step >= total_steps
    if current.get("max_steps", -1) > 0 and step >= current["max_steps"]:
        return True
    same_length = saved is not None and all(saved.get(k) == current.get(k) for k in LENGTH_KEYS)
    return same_length and state.get("max_steps", 0) > 0 and step >= state["max_steps"]


@dataclass
class RunDir:
    """The prepared output directory of one run: the checkpoint to resume (or None), whether the run is finished,
    and the held lock (released by ``release`` or when the process ends)."""

    out: Path
    checkpoint: str | None = None
    finished: bool = False
    fresh: bool = False
    created: bool = False
    _lock: object = field(default=None, repr=False)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None

    def mark_finished(self) -> None:
        (self.out / DONE).write_text(json.dumps({"finished": True}) + "\n")

    def started(self) -> bool:
        """Whether this run left anything worth keeping: a checkpoint or a logged training step."""
        if any(CHECKPOINT.match(p.name) for p in self.out.iterdir()):
            return True
        metrics = self.out / METRICS
        if not metrics.is_file() or metrics.is_symlink():
            return False
        for line in metrics.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) >= 1:
                    return True
            except (ValueError, AttributeError):
                continue
        return False

    def discard_if_unstarted(self) -> bool:
        """After a failure: a run that started in an empty (or new) output_dir and trained no step leaves nothing
        behind, so the same command can simply be run again. Main process only. Returns whether it discarded."""
        if self._lock is None or not self.fresh or not self.out.is_dir() or self.started():
            self.release()
            return False
        self.release()
        remove_entries(self.out.iterdir())
        if self.created:
            self.out.rmdir()
        return True


def try_lock(handle, *, shared: bool = False) -> bool:
    """Non-blocking flock of an open file (exclusive, or shared); False when another process holds a conflicting
    one. On an already locked handle this converts the lock (not atomically: flock drops it first)."""
    try:
        fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


def busy_error(out: Path, label: str = "output_dir") -> ConfigError:
    """The one line for a directory whose lock another process holds (``label``: the config key naming it)."""
    return ConfigError(f"{label} {out} is in use by another run (lock {out / LOCK} is held); wait for it or choose "
                       f"another {label}")


def acquire_lock(out: Path, label: str = "output_dir"):
    """Exclusive, non-blocking flock on ``out/.lock``; a second run on the same directory gets a ConfigError."""
    handle = open(out / LOCK, "a+")  # noqa: SIM115 - held for the whole run, closed by RunDir.release
    try:
        locked = try_lock(handle)
    except BaseException:
        handle.close()
        raise
    if not locked:
        handle.close()
        raise busy_error(out, label)
    return handle


def open_run(out: str | os.PathLike, config, *, resume: str | None, overwrite: bool, is_main: bool = True,
             objective_keys=OBJECTIVE_KEYS, total_steps: int | None = None) -> RunDir:
    """Prepare ``out`` for a run with ``config`` (a config dataclass, or its run_config.yaml mapping).

    Main process: create the directory, take the lock, clean stale temporaries, clear the old run on ``overwrite``
    (not when resuming). Every process: resolve ``resume`` ('latest' -> newest complete checkpoint; a given path
    must be complete), refuse an objective change (``objective_keys``: the run_config keys that define this
    command's objective), decide whether the run is already finished (``total_steps``: its last step, when known
    before training). Main process: cut ``metrics.jsonl`` back to the resumed step. Raises ConfigError (one line)
    for each refusal.
    """
    out = Path(out)
    check_output_path(out)
    if not isinstance(config, dict):
        config = yaml.safe_load(dump_yaml(config))  # compared as run_config.yaml stores it
    run = RunDir(out)
    if is_main:
        run.created = not out.exists()
        run.fresh = run.created or all(p.name == LOCK for p in out.iterdir())
        out.mkdir(parents=True, exist_ok=True)
        run._lock = acquire_lock(out)
        check_metrics_file(out / METRICS)
        removed = clean_stale(out)
        if removed:
            logger.info("removed leftovers of an interrupted run in %s: %s", out, ", ".join(removed))
        if overwrite and not resume:
            cleared = clear_run(out)
            if cleared:
                logger.info("overwrite_output_dir: removed the previous run in %s (%s)", out, ", ".join(cleared))
    checkpoint = None
    if resume == "latest":
        checkpoint = latest_complete_checkpoint(out)
        if checkpoint is None:
            logger.warning("resume_from_checkpoint=latest but no complete checkpoint in %s: starting fresh", out)
    elif resume:
        checkpoint = Path(resume)
        problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else "not a directory"
        if problem:
            run.release()
            raise ConfigError(f"resume_from_checkpoint {checkpoint}: not a complete checkpoint ({problem})")
    if checkpoint is not None:
        saved = _saved_config(checkpoint)
        difference = objective_difference(saved, config, objective_keys) if saved else None
        if difference:
            run.release()
            raise ConfigError(f"resume_from_checkpoint {checkpoint}: the objective changed ({difference}); resume "
                              "with the same settings or start a new output_dir")
        run.checkpoint = str(checkpoint)
        run.finished = is_finished(checkpoint, saved, config, total_steps)
    if is_main:
        if not run.finished:
            (out / DONE).unlink(missing_ok=True)
        step = trainer_state(checkpoint)["global_step"] if checkpoint is not None else 0
        if resume and not run.finished and truncate_metrics(out / METRICS, step):
            logger.info("metrics.jsonl cut back to step %d (the resumed checkpoint)", step)
    return run


def final_model_saved(out: str | os.PathLike) -> bool:
    """The final model of a finished run was saved completely (``RunDir.mark_finished`` ran after it)."""
    return (Path(out) / DONE).is_file()




def loop_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete ``checkpoint-<step>`` directories of an accelerate-loop run, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(out).glob("checkpoint-*")
             if (m := CHECKPOINT.match(p.name)) and (p / LOOP_STATE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_note(output_dir: str | os.PathLike) -> str:
    """For a run that stops on an error: where its last checkpoint is, or that it has none yet.

    Counts the newest complete ``checkpoint-<step>`` (``latest_complete_checkpoint``: Trainer's, or one the
    accelerate loops of ``chipo rl`` / ``chipo online`` renamed into place).
    """
    out = Path(output_dir)
    latest = latest_complete_checkpoint(out)
    if latest is None:
        return f"no checkpoint was saved yet in {out}"
    return f"the last good checkpoint is {latest}"
