"""Trainer callbacks shared by the Trainer-based commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import TrainerCallback


class JsonlMetricsCallback(TrainerCallback):
    """Appends every log event (train and eval) as one JSON line to ``metrics.jsonl`` on the main process."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
