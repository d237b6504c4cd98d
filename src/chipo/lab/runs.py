"""Files of a sweep and its runs: results.jsonl (append-safe), checkpoints by epoch, the trainer's per-epoch
log, data loading, and keeping library chatter out of worker processes. Used by ``chipo.lab.sweep``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path

from chipo.config import ConfigError


def read_results(path: str | os.PathLike) -> list[dict]:
    """Rows of results.jsonl (a torn last line from an interrupted write is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def checkpoints_by_epoch(run_dir: Path) -> dict[int, Path]:
    """{epoch: checkpoint directory} from each checkpoint's trainer_state.json."""
    out = {}
    for ckpt in run_dir.glob("checkpoint-*"):
        state = ckpt / "trainer_state.json"
        if state.is_file():
            epoch = json.loads(state.read_text()).get("epoch")
            if epoch is not None:
                out[int(round(epoch))] = ckpt
    return out


def save_at_epochs(epochs):
    """A ``TrainerCallback`` that keeps ``save_strategy="epoch"``'s checkpoint only at the given epochs (and the
    last): the sweep evaluates a few epochs of a long run (1, 2, 4, ..., 32), and every other checkpoint (model,
    optimizer, RNG states) is written only to be deleted; measured on the default demo's runs, ~70 ms each."""
    from transformers import TrainerCallback

    keep = {int(e) for e in epochs}

    class SaveAtEpochs(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            epoch = int(round(state.epoch or 0))
            if control.should_save and epoch not in keep and epoch < int(round(args.num_train_epochs)):
                control.should_save = False
            return control

    return SaveAtEpochs()


def _quiet_libraries() -> None:
    """Silence library chatter (per-run tokenizing / weight-loading bars, info logs) in worker processes."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("chipo").setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_libraries():
    """``_quiet_libraries`` for the duration of a block, restoring the previous state (library callers, tests)."""
    import datasets
    import transformers

    state = (datasets.is_progress_bar_enabled(), transformers.utils.logging.get_verbosity(),
             transformers.utils.logging.is_progress_bar_enabled(), logging.getLogger("chipo").level)
    _quiet_libraries()
    try:
        yield
    finally:
        datasets.enable_progress_bars() if state[0] else datasets.disable_progress_bars()
        transformers.utils.logging.set_verbosity(state[1])
        if state[2]:
            transformers.utils.logging.enable_progress_bar()
        logging.getLogger("chipo").setLevel(state[3])


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line with a single O_APPEND write (safe with several worker processes)."""
    data = (json.dumps(row, default=float) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _steps_per_epoch(dataset: str, batch_size: int) -> int:
    """Optimizer steps per epoch of a local JSON-lines file (log once per epoch); 10 when unknown."""
    path = Path(dataset)
    if path.is_file() and path.suffix == ".jsonl":
        n = sum(1 for line in path.open() if line.strip())
        return max(1, math.ceil(n / batch_size))
    return 10


def _train_metrics_by_epoch(path: Path) -> dict[int, dict]:
    """Training-set loss and implicit-reward accuracy logged at each whole epoch (the proxy's own view)."""
    out: dict[int, dict] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        epoch = rec.get("epoch")
        if epoch is None or "loss" not in rec or abs(epoch - round(epoch)) > 1e-6:
            continue
        out[int(round(epoch))] = {"train_loss": rec["loss"], "train_acc": rec.get("rewards/accuracies")}
    return out


def load_prompts(source: str, split: str = "train", limit: int | None = None) -> tuple[list[str], list[str | None]]:
    """String prompts and optional reference responses ('reference', 'completion' or 'chosen' column)."""
    from chipo.data.prompts import load_prompts as load_prompt_rows

    rows = load_prompt_rows(source, split, limit, text_only=True)
    return rows.prompts, rows.references


def load_pairs(source: str, split: str = "train") -> list[dict]:
    """Standard-format preference rows (prompt / chosen / rejected strings)."""
    from chipo.data import load_preference_dataset

    dataset = load_preference_dataset(source, split)
    missing = {"prompt", "chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise ConfigError(f"{source}: missing column(s) {sorted(missing)}")
    return [{"prompt": p, "chosen": c, "rejected": r}
            for p, c, r in zip(dataset["prompt"], dataset["chosen"], dataset["rejected"])]
