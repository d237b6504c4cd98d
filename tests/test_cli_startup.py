"""Start-up cost of the chipo command line: heavy modules are imported only by the commands that use them.

Each check runs a fresh interpreter (this test process has imported everything already) and reads
``sys.modules`` after the command: a module-level import of a heavy package that comes back fails here.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chipo.cli.main import _exit_without_full_collections, run_guarded

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "transformers", "datasets", "pandas", "pyarrow", "peft", "matplotlib", "scipy", "chipo.lab",
         "chipo.train.preference")


def loaded_after(code: str) -> tuple[set[str], str]:
    """(heavy modules in sys.modules after running ``code`` in a fresh interpreter, its stdout)."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    *text, last = out.stdout.strip().splitlines()
    return set(json.loads(last)), "\n".join(text)


def test_packages_and_light_commands_import_no_heavy_module():
    """``import chipo.cli.main``, ``chipo.data`` (its errors and formats), ``chipo.train`` and ``chipo.bandit`` (the
    packages), ``chipo judge --help`` and ``chipo bandit --help`` need none of torch, transformers, datasets,
    scipy, matplotlib, the lab or the preference trainer."""
    code = ("import contextlib, io\nimport chipo.cli.main, chipo.data, chipo.train, chipo.bandit\n"
            "from chipo.data import DataError, detect_format\n"
            "buf = io.StringIO()\n"
            "for cmd in ('judge', 'bandit'):\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try:\n            chipo.cli.main.main([cmd, '--help'])\n"
            "        except SystemExit as e:\n            assert e.code == 0\n"
            "print(buf.getvalue())")
    heavy, text = loaded_after(code)
    assert heavy == set()
    assert "--judge {openai,reward-model}" in text and "kl_trap_n" in text  # both helps were printed in full


def test_bandit_choices_are_the_experiments():
    """``chipo.bandit.command`` spells the experiment names out (to stay light); they must be the experiments'."""
    from chipo.bandit.command import CHOICES, EXPERIMENTS
    from chipo.bandit.experiments import EXPERIMENTS as RUN

    assert EXPERIMENTS == RUN and CHOICES == (*RUN, "bench", "all")


@pytest.mark.slow
def test_trainer_help_needs_only_training_arguments():
    """``chipo train --help`` and ``chipo rl --help`` list TrainingArguments' keys, so they import transformers and
    torch; not datasets, pandas, pyarrow, the lab or the preference trainer (each only used when a command runs)."""
    code = ("import contextlib, io\nfrom chipo.cli.main import main\n"
            "for cmd in ('train', 'rl', 'online'):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n            main([cmd, '--help'])\n"
            "        except SystemExit as e:\n            assert e.code == 0\n")
    heavy, _ = loaded_after(code)
    assert {"torch", "transformers"} <= heavy  # the probe sees imports at all
    assert heavy & {"datasets", "pandas", "pyarrow", "chipo.lab", "chipo.train.preference", "matplotlib"} == set()


def test_lazy_names_are_the_modules_objects():
    """The lazily re-exported names are the defining modules' objects; unknown names still raise."""
    import chipo.bandit
    import chipo.data
    import chipo.train
    from chipo.bandit.estimators import fit_rewards
    from chipo.bandit.optimum import regularized_optimum
    from chipo.data.collator import PreferenceCollator
    from chipo.data.loading import load_preference_dataset
    from chipo.train.pairwise import NonFiniteError
    from chipo.train.preference import PreferenceTrainer

    assert chipo.train.PreferenceTrainer is PreferenceTrainer
    assert chipo.train.NonFiniteError is NonFiniteError
    assert chipo.data.PreferenceCollator is PreferenceCollator
    assert chipo.data.load_preference_dataset is load_preference_dataset
    assert chipo.bandit.fit_rewards is fit_rewards and chipo.bandit.regularized_optimum is regularized_optimum
    for package in (chipo.data, chipo.train, chipo.bandit):
        assert set(package.__all__) <= set(dir(package))
        assert all(getattr(package, name) is not None for name in package.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        chipo.data.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        chipo.train.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        chipo.bandit.nope  # noqa: B018


def test_run_guarded_exit_codes_without_importing_the_trainer_up_front(capsys):
    """A NonFiniteError still exits 3 with one line; any other RuntimeError keeps its traceback (re-raised)."""
    from chipo.train.pairwise import NonFiniteError

    def nan():
        raise NonFiniteError("non-finite loss at step 3")

    def bug():
        raise RuntimeError("internal")

    assert run_guarded(nan) == 3
    assert capsys.readouterr().err == "chipo: error: non-finite loss at step 3\n"
    with pytest.raises(RuntimeError, match="internal"):
        run_guarded(bug)


def test_exit_path_finalizes_the_commands_garbage():
    """Before freezing the heap, the exit path collects: a reference cycle with a finalizer, garbage when the
    command returns, is finalized as a full collection at interpreter exit would have done."""
    finalized = []

    class Node:
        def __del__(self):
            finalized.append(True)

    gc.disable()  # no automatic collection between making the garbage and the call
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: reference counting alone never frees it
        del a, b
        assert finalized == []
        _exit_without_full_collections()
    finally:
        gc.unfreeze()  # this test process goes on: give its objects back to the collector
        gc.enable()
    assert finalized == [True, True]
