"""Where every stage of the TL;DR recipe reads and writes, under one recipe directory.

::

    <out_dir>/
      experiment.json               the sweep's settings key (checked on rerun: one directory, one set of settings)
      sweep.json                    the sweep's whole config (the later stages read sft_model from it)
      ref_cache/                    pi_ref's log-probs on the preference pairs, computed once for the whole sweep
      runs/<loss>_beta<b>_seed<s>/  one ``chipo train`` run: checkpoint-*/ per kept epoch, the final model and
                                    done.json (loss, beta, seed, kept checkpoints; written when the run finished)
      generations/experiment.json   the generate stage's sampling settings (checked on rerun)
      generations/<cell>.jsonl      one sampled summary per test prompt, with log pi, log pi_ref and their ratio
      generations/<cell>.json       the cell's sampling settings and KL estimates (written last: the cell is done)
      judgements/<tag>/<cell>.json  win rate against the reference summaries by judge <tag>, counts of
                                    malformed/failed verdicts; <cell>.details.jsonl has every verdict
      report/                       report.md, table1.md, kl.md, plots, results.json, results.csv
      commands.log                  every stage command that completed here, in order (the SFT stage keeps its
                                    own in its output_dir, which the report also reads)

A generation/judgement cell is ``<run>_epoch<e>``, or ``sft_epoch0`` for the SFT model (pi_ref) itself.
Every file is written to a temporary name and renamed into place, so a reader never sees half a file.

The recipe directory (sweep stage), ``generations/``, ``judgements/<tag>/`` and the report directory are experiment
directories (``chipo.train.experiment_dir``): each has a lock and an ``experiment.json`` with the stage's settings,
and ``overwrite=true`` clears what that stage (and, for the sweep, every later stage) wrote there, never other
files.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from chipo.io import atomic_write_text
from chipo.lab.sweep import cell_name

SFT_CELL = "sft"
RECIPE_FILES = ("sweep.json", "ref_cache", "runs", "generations", "judgements", "report", "commands.log")
"""What the stages write into the recipe directory (an older directory without experiment.json is recognised by
its sweep.json; anything else in it, such as the SFT model's directory, is left alone)."""


@dataclass(frozen=True)
class Cell:
    """A policy to evaluate: run (loss, beta, seed) at ``epoch``, or the SFT model (``loss == "sft"``, epoch 0)."""

    loss: str
    beta: float | None
    seed: int | None
    epoch: int

    @property
    def run(self) -> str:
        return SFT_CELL if self.loss == SFT_CELL else cell_name(self.loss, self.beta, self.seed)

    @property
    def name(self) -> str:
        return f"{self.run}_epoch{self.epoch}"

    def as_dict(self) -> dict:
        return {"cell": self.name, "loss": self.loss, "beta": self.beta, "seed": self.seed, "epoch": self.epoch}


SFT = Cell(SFT_CELL, None, None, 0)


class Layout:
    """Paths of a recipe directory (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.root = Path(out_dir).expanduser()

    @property
    def sweep_json(self) -> Path:
        return self.root / "sweep.json"

    @property
    def ref_cache(self) -> Path:
        return self.root / "ref_cache"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run_dir(self, loss: str, beta: float, seed: int) -> Path:
        return self.runs / cell_name(loss, beta, seed)

    @property
    def generations(self) -> Path:
        return self.root / "generations"

    def generation(self, cell: Cell) -> tuple[Path, Path]:
        """(samples jsonl, meta json) of a cell."""
        # Not Path.with_suffix: cell names contain dots ("beta0.05").
        return self.generations / f"{cell.name}.jsonl", self.generations / f"{cell.name}.json"

    def judgements(self, tag: str) -> Path:
        return self.root / "judgements" / tag

    def judgement(self, tag: str, cell: Cell) -> tuple[Path, Path]:
        """(result json, per-item details jsonl) of a cell under judge ``tag``."""
        directory = self.judgements(tag)
        return directory / f"{cell.name}.json", directory / f"{cell.name}.details.jsonl"

    def judge_tags(self) -> list[str]:
        directory = self.root / "judgements"
        return sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []

    def finished_runs(self) -> list[dict]:
        """done.json of every finished run (loss, beta, seed, epochs, checkpoints {epoch: path}), sorted."""
        out = []
        for done in sorted(self.runs.glob("*/done.json")) if self.runs.is_dir() else []:
            out.append(json.loads(done.read_text()))
        return sorted(out, key=lambda d: (d["loss"], -d["beta"], d["seed"]))

    @property
    def commands_log(self) -> Path:
        return self.root / "commands.log"


def only_cell_files(directory: Path) -> bool:
    """Whether ``directory`` holds nothing but cell files (``*.json``, ``*.jsonl``): a generations/ or judgements/
    directory written before experiment.json existed."""
    from chipo.train.rundir import LOCK  # imports transformers: not when the CLI only parses its arguments

    return all(p.is_file() and p.name.endswith((".json", ".jsonl")) for p in directory.iterdir()
               if p.name != LOCK)


def record_command(directory: str | os.PathLike, argv: list[str]) -> None:
    """Append ``chipo <argv>`` to ``directory/commands.log`` unless that exact line is already there.

    The report prints this log, so it shows the commands that actually produced the directory; reruns of the same
    command (resuming after an interruption) are recorded once.
    """
    path = Path(directory).expanduser() / "commands.log"
    line = shlex.join(["chipo", *argv])
    lines = path.read_text().splitlines() if path.is_file() else []
    if line not in lines:
        atomic_write_text(path, "".join(f"{x}\n" for x in [*lines, line]))
