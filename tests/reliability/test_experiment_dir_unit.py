"""chipo.train.experiment_dir on hand-built directories: lock, marker key check, overwrite, adoption, cleanup."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import textwrap

import pytest

from chipo.config import ConfigError
from chipo.train.experiment_dir import MARKER, key_recorded_in, open_experiment

KEY = {"lr": 0.001, "epochs": 4, "data": "prefs.jsonl"}


def names(path):
    return sorted(p.name for p in path.iterdir())


def test_new_directory_records_the_key_and_a_finish(tmp_path):
    out = tmp_path / "exp"
    with open_experiment(out, KEY) as exp:
        assert exp.created and exp.fresh and not exp.finished
        (out / "results.jsonl").write_text("{}\n")
        exp.finish({"rows": 1})
    marker = json.loads((out / MARKER).read_text())
    assert marker["key"] == KEY and marker["finished"] is True and marker["summary"] == {"rows": 1}
    with open_experiment(out, dict(KEY)) as exp:  # same settings: resumes, and knows it finished
        assert exp.finished and exp.summary == {"rows": 1} and not exp.fresh


def test_changed_settings_are_refused_naming_the_keys_and_the_file(tmp_path):
    with open_experiment(tmp_path, KEY, what="sweep") as exp:
        (tmp_path / "results.jsonl").write_text("{}\n")
        exp.finish()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError) as err, open_experiment(tmp_path, {**KEY, "lr": 0.01, "epochs": 8}, what="sweep"):
        pytest.fail("must not enter")
    message = str(err.value)
    assert "\n" not in message and "sweep with other settings (epochs, lr): " in message
    assert f"epochs was 4 in {tmp_path / MARKER}, now 8" in message and "overwrite=true" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing rewritten
    with open_experiment(tmp_path, KEY, what="sweep") as exp:  # the refusal released the lock
        assert exp.finished


def test_key_compares_as_stored_json(tmp_path):
    """A tuple and a list of the same values are the same setting once written to experiment.json."""
    with open_experiment(tmp_path, {"betas": (0.1, 0.01)}):
        pass
    with open_experiment(tmp_path, {"betas": [0.1, 0.01]}) as exp:
        assert exp.key == {"betas": [0.1, 0.01]}


def test_overwrite_clears_the_experiment_but_not_what_was_there_before(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with open_experiment(tmp_path, KEY) as exp:  # a folder of the user's: adopted, notes.txt recorded as theirs
        assert exp.foreign == ("notes.txt",) and not exp.fresh
        (tmp_path / "runs" / "a").mkdir(parents=True)
        (tmp_path / "results.jsonl").write_text("{}\n")
        exp.finish()
    with open_experiment(tmp_path, {**KEY, "lr": 1.0}, overwrite=True) as exp:
        assert not exp.finished and not exp.started()
        assert names(tmp_path) == [".lock", MARKER, "notes.txt"]
    assert json.loads((tmp_path / MARKER).read_text())["key"]["lr"] == 1.0
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_that_is_not_an_experiment(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=f"has no {MARKER}.*refusing to clear it"), \
            open_experiment(tmp_path, KEY, overwrite=True):
        pytest.fail("must not enter")
    assert names(tmp_path) == [".lock", "data", "thesis.tex"]


def test_busy_directory_is_one_line_naming_it(tmp_path):
    tmp_path.joinpath(".lock").touch()
    with open(tmp_path / ".lock") as held:  # another open file description: flock conflicts as across processes
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=f"out_dir {tmp_path} is in use by another run") as err, \
                open_experiment(tmp_path, KEY):
            pytest.fail("must not enter")
        assert "\n" not in str(err.value)
    with open_experiment(tmp_path, KEY):
        pass


def test_nested_open_of_the_same_directory_is_refused(tmp_path):
    with open_experiment(tmp_path, KEY), pytest.raises(ConfigError, match="already open in this process"), \
            open_experiment(tmp_path / ".", KEY):
        pytest.fail("must not enter")


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_before_any_result_leaves_nothing(tmp_path, error):
    out = tmp_path / "new" / "exp"
    with pytest.raises(type(error)), open_experiment(out, KEY):
        raise error
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(type(error)), open_experiment(empty, KEY):
        (empty / "runs" / "a").mkdir(parents=True)  # folders without a file in them are no result
        raise error
    assert empty.is_dir() and names(empty) == []  # it was there before: kept, emptied of what we wrote


def test_failure_after_a_result_keeps_it_and_releases_the_lock(tmp_path):
    with pytest.raises(KeyboardInterrupt), open_experiment(tmp_path, KEY):
        (tmp_path / "results.jsonl").write_text("{}\n")
        raise KeyboardInterrupt
    with open_experiment(tmp_path, KEY) as exp:
        assert exp.started() and not exp.finished


def test_replace_key_accepts_other_settings_and_records_them(tmp_path):
    with open_experiment(tmp_path, KEY) as exp:
        exp.finish()
    with open_experiment(tmp_path, {"judge": "b"}, replace_key=True) as exp:
        assert not exp.finished
    assert json.loads((tmp_path / MARKER).read_text())["key"] == {"judge": "b"}


def test_legacy_key_makes_an_older_layout_ours(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"results_key": KEY}))
    (tmp_path / "results.jsonl").write_text("{}\n")

    legacy = key_recorded_in("sweep.json", "results_key")
    assert legacy(tmp_path) == KEY
    assert key_recorded_in("sweep.json")(tmp_path) is None and key_recorded_in("table.json")(tmp_path) is None
    with pytest.raises(ConfigError, match="other settings \\(lr"), \
            open_experiment(tmp_path, {**KEY, "lr": 2.0}, legacy_key=legacy):
        pytest.fail("must not enter")
    with open_experiment(tmp_path, {**KEY, "lr": 2.0}, legacy_key=legacy, overwrite=True):
        assert names(tmp_path) == [".lock", MARKER]  # recognised as ours: cleared, not adopted


HOLDER = textwrap.dedent("""
    import sys
    from chipo.train.experiment_dir import open_experiment
    with open_experiment(sys.argv[1], {"lr": 0.001}, shared=True):
        print("ready", flush=True)
        sys.stdin.readline()
""")


def test_shared_participants_work_together_and_block_overwrite(tmp_path):
    """Two processes fill one shared experiment; overwrite and an exclusive open wait for both to leave."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with open_experiment(tmp_path, {"lr": 0.001}, shared=True) as exp:
            assert not exp.fresh
        with pytest.raises(ConfigError, match="other settings"), \
                open_experiment(tmp_path, {"lr": 0.5}, shared=True):
            pytest.fail("must not enter")
        for kwargs in ({"overwrite": True, "shared": True}, {}):
            with pytest.raises(ConfigError, match="in use by another run"), \
                    open_experiment(tmp_path, {"lr": 0.001}, **kwargs):
                pytest.fail("must not enter")
    finally:
        child.communicate("\n", timeout=30)
    assert child.returncode == 0
    with open_experiment(tmp_path, {"lr": 0.5}, overwrite=True, shared=True):
        pass


def test_legacy_directory_keeps_what_is_not_the_callers(tmp_path):
    """An older layout recognised by legacy_key, with a folder of the user's inside (an SFT model): overwrite clears
    only the caller's names."""
    (tmp_path / "sweep.json").write_text(json.dumps({"results_key": KEY}))
    (tmp_path / "runs").mkdir()
    (tmp_path / "sft").mkdir()
    with open_experiment(tmp_path, KEY, overwrite=True, owned=("sweep.json", "runs"),
                         legacy_key=key_recorded_in("sweep.json", "results_key")) as exp:
        assert exp.foreign == ("sft",)
    assert names(tmp_path) == [".lock", MARKER, "sft"]


def test_another_kind_of_experiment_is_never_taken_over(tmp_path):
    """A report pointed at its sweep's directory must not re-key (replace_key) or clear (overwrite) the sweep."""
    with open_experiment(tmp_path, KEY, what="sweep") as exp:
        (tmp_path / "results.jsonl").write_text("{}\n")
        exp.finish()
    for kwargs in ({"replace_key": True}, {"overwrite": True}):
        with pytest.raises(ConfigError, match=f"holds a sweep \\({tmp_path / MARKER}\\), not a report"), \
                open_experiment(tmp_path, {"tag": "x"}, what="report", **kwargs):
            pytest.fail("must not enter")
    assert names(tmp_path) == [".lock", MARKER, "results.jsonl"]
    assert json.loads((tmp_path / MARKER).read_text())["key"] == KEY
