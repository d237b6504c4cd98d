"""The lab's experiments share one shape and are found by name (``chipo.lab.experiments``): the registry lists the
lab's five, an unknown name is one clear error, and an experiment registered here -- a toy that writes rows and
renders a section from them -- runs through ``chipo demo``'s own runner and lands in its report, so a new experiment
is one registration and no new branch anywhere."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from chipo.cli.lab import demo
from chipo.config import ConfigError
from chipo.lab import experiments
from chipo.lab.demo import run_demo
from chipo.lab.experiments import Context, Experiment

LAB = ("offline", "rlhf", "online", "methods", "monitor-validation")


def test_the_registry_lists_the_labs_experiments_each_in_the_same_shape():
    assert list(experiments.names())[:5] == list(LAB)
    directories = set()
    for name in LAB:
        e = experiments.get(name)
        assert e.name == name and e.title and callable(e.run) and callable(e.render)
        assert isinstance(e.settings_for(quick=True), e.settings) and isinstance(e.settings_for(), e.settings)
        assert e.settings_for(quick=True) != e.settings_for()  # quick() is a smaller size, not the protocol
        assert all(need in LAB for need in e.needs)
        json.dumps(e.settings_key(e.settings_for()))  # the directory protocol's key is plain JSON
        directories.add(e.directory)
    assert len(directories) == len(LAB)
    assert experiments.get("offline").directory == "sweep"  # chipo demo's directories as before: sweep/, rlhf/...
    assert experiments.with_needs(["online", "rlhf"]) == ["offline", "online", "rlhf"]


def test_an_unknown_name_is_one_clear_error_listing_the_names(tmp_path, capsys):
    with pytest.raises(ConfigError) as info:
        experiments.get("offlne")
    message = str(info.value)
    assert "\n" not in message and "'offlne'" in message and all(name in message for name in LAB)
    assert demo([f"out={tmp_path / 'demo'}", "experiments=offline,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and "monitor-validation" in err[0]
    assert not (tmp_path / "demo").exists()  # refused before anything ran


# ------------------------------------------------------------------------------------------------ a toy experiment


@dataclasses.dataclass(frozen=True)
class ToySettings:
    n: int = 5

    @staticmethod
    def quick() -> ToySettings:
        return ToySettings(n=2)


CALLS: list[tuple[str, int]] = []


def _page_run(context: Context, settings: ToySettings, out: Path) -> None:
    CALLS.append(("toy-page", settings.n))
    (out / "rows.jsonl").write_text("".join(json.dumps({"i": i, "square": i * i}) + "\n" for i in range(settings.n)))


def _page_render(out: Path, context: Context) -> str:
    """A whole page, as the offline experiment's: written into the report directory, returned."""
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    context.report_dir.mkdir(parents=True, exist_ok=True)
    text = (f"# Toy page\n\n{len(rows)} rows.\n\n## Machine, versions, time\n\n- machine: toy\n")
    (context.report_dir / "report.md").write_text(text)
    return text


def _page_headline(out: Path) -> str:
    return f"toy rows: {len((out / 'rows.jsonl').read_text().splitlines())}"


def _toy_run(context: Context, settings: ToySettings, out: Path) -> None:
    CALLS.append(("toy", settings.n))
    squares = [json.loads(line)["square"] for line in (context.dir("toy-page") / "rows.jsonl").read_text().splitlines()]
    (out / "results.json").write_text(json.dumps({"sum of squares": sum(squares[: settings.n])}))


def _toy_render(out: Path, context: Context) -> str:
    total = json.loads((out / "results.json").read_text())["sum of squares"]
    n = experiments.record(out)["settings"]["n"]  # what the runner recorded, read from disk like the rows
    return f"## Toy section\n\nThe sum of squares below {n}: {total}.\n"


@pytest.fixture
def toys():
    CALLS.clear()
    page = experiments.register(Experiment("toy-page", "a page of rows", ToySettings, _page_run, _page_render,
                                           headline=_page_headline))
    toy = experiments.register(Experiment("toy", "a section from the page's rows", ToySettings, _toy_run, _toy_render,
                                          needs=("toy-page",)))
    yield page, toy
    for name in ("toy-page", "toy"):
        experiments._REGISTRY.pop(name, None)


def test_a_registered_experiment_runs_through_chipo_demo_and_its_section_lands_in_the_report(toys, tmp_path, capsys):
    out = tmp_path / "demo"
    assert "toy" in experiments.names()
    # 0 + 1 + 4 + 9 + 16 = 30 at the protocol's size (n = 5); --quick takes quick(): n = 2, 0 + 1 = 1.
    assert demo([f"out={out}", "experiments=toy", "--no-progress"]) == 0
    text = (out / "report" / "report.md").read_text()
    assert CALLS == [("toy-page", 5), ("toy", 5)]
    printed = capsys.readouterr().out
    assert "[+] toy: a section from the page's rows" in printed and "toy rows: 5\n\nDone in" in printed
    assert text.index("# Toy page") < text.index("## Toy section") < text.index("## Machine, versions, time")
    assert "sum of squares below 5: 30." in text and "Time of the toy experiment:" in text
    assert "CPU time of all its processes" in text
    for name in ("toy-page", "toy"):
        record = experiments.record(out / name)
        assert record["settings"] == {"n": 5} and record["timing"]["cpu_s"] >= 0 and record["timing"]["wall_s"] > 0
        marker = json.loads((out / name / "experiment.json").read_text())  # the directory protocol's marker
        assert marker["finished"] and marker["key"] == {"n": 5}

    # Finished with the same settings: nothing runs again, the report is composed from disk.
    assert demo([f"out={out}", "experiments=toy", "--no-progress"]) == 0
    assert CALLS == [("toy-page", 5), ("toy", 5)]
    assert "sum of squares below 5: 30." in (out / "report" / "report.md").read_text()


def test_other_settings_in_an_experiments_directory_are_refused_unless_overwrite(toys, tmp_path, capsys):
    out = tmp_path / "demo"
    settings = {"toy-page": ToySettings(), "toy": ToySettings()}
    run_demo(out, settings, echo=lambda _: None)
    with pytest.raises(ConfigError, match=r"toy-page experiment with other settings \(n\b"):
        run_demo(out, {"toy-page": ToySettings(n=3), "toy": ToySettings()}, echo=lambda _: None)
    assert len(CALLS) == 2 and len((out / "toy-page" / "rows.jsonl").read_text().splitlines()) == 5
    # --quick through the command line: each experiment's quick() (n = 2), here over the old run.
    assert demo([f"out={out}", "experiments=toy", "--quick", "overwrite=true", "--no-progress"]) == 0
    assert CALLS[2:] == [("toy-page", 2), ("toy", 2)]
    assert "sum of squares below 2: 1." in (out / "report" / "report.md").read_text()


def test_a_page_becomes_a_section_with_its_links_pointing_from_the_report(tmp_path):
    page = tmp_path / "methods" / "report.md"
    page.parent.mkdir()
    page.write_text("# Method table\n\n![plot](gold.png) [csv](table.csv) [paper](https://arxiv.org/abs/2407.13399)"
                    " [here](#settings)\n\n## Settings\n")
    section = experiments.as_section(page, tmp_path / "report")
    assert section == ("## Method table\n\n![plot](../methods/gold.png) [csv](../methods/table.csv) "
                       "[paper](https://arxiv.org/abs/2407.13399) [here](#settings)\n\n### Settings\n")
    report = "# R\n\n## Verdicts\n\n## Machine, versions, time\n\n- m\n"
    assert experiments.insert_section(report, "## S\n\nbody\n") == (
        "# R\n\n## Verdicts\n\n## S\n\nbody\n\n## Machine, versions, time\n\n- m\n")
    assert experiments.insert_section("# R\n", "## S\n") == "# R\n\n## S\n\n"


def test_an_experiments_directory_is_locked_while_it_runs_and_a_failed_start_leaves_nothing(toys, tmp_path):
    import fcntl

    out = tmp_path / "demo"
    (out / "toy-page").mkdir(parents=True)
    with open(out / "toy-page" / ".lock", "a+") as lock:  # another run holds the directory: its lock is taken
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="in use by another run"):
            run_demo(out, {"toy-page": ToySettings(), "toy": ToySettings()}, echo=lambda _: None)
    assert CALLS == []

    def fail(context, settings, out_dir):
        raise RuntimeError("the toy fails before writing anything")

    experiments.register(dataclasses.replace(experiments.get("toy-page"), run=fail))
    with pytest.raises(RuntimeError, match="toy fails"):
        run_demo(tmp_path / "fresh", {"toy-page": ToySettings()}, echo=lambda _: None)
    assert not (tmp_path / "fresh" / "toy-page").exists()


def test_a_report_that_starts_with_a_section_gets_a_title(toys, tmp_path):
    """The toy section's experiment needs the page; registered without that need, it is the first and only one."""
    experiments.register(dataclasses.replace(experiments.get("toy"), needs=(), run=_toy_alone))
    report = run_demo(tmp_path / "demo", {"toy": ToySettings(n=1)}, echo=lambda _: None)
    text = report.read_text()
    assert text.startswith("# chipo lab: toy\n\n## Toy section\n\nThe sum of squares below 1: 7.")
    assert "Time of the toy experiment:" in text


def _toy_alone(context: Context, settings: ToySettings, out: Path) -> None:
    (out / "results.json").write_text(json.dumps({"sum of squares": 7}))


def test_chipo_demo_names_its_experiments_and_sizes_only_the_offline_sweep():
    from chipo.lab.configs import DemoConfig

    assert DemoConfig().experiment_names() == ["offline"]
    assert DemoConfig(full=True).experiment_names() == ["offline", "rlhf", "online"]
    assert DemoConfig(experiments=["online"]).experiment_names() == ["online"]  # offline comes first: with_needs
    assert experiments.with_needs(DemoConfig(experiments=["online"]).experiment_names()) == ["offline", "online"]
    with pytest.raises(ConfigError, match="either --full or experiments="):
        DemoConfig(full=True, experiments=["online"])
    with pytest.raises(ConfigError, match="unknown experiment 'rhlf'"):
        DemoConfig(experiments=["rhlf"])
    assert DemoConfig(seeds=3, epochs=2, ablations=True).offline_changes() == {"seeds": 3, "epochs": 2,
                                                                               "ablations": True}
    assert DemoConfig(betas=[0.1]).offline_changes() == {"betas": (0.1,), "ablations": False}


def test_report_templates_are_package_data_read_through_importlib_resources():
    """Every template is found through importlib.resources (as an installed package reads it: pyproject ships
    chipo/lab/templates/*.md) and fills without a missing placeholder; the offline texts name the paper."""
    from importlib.resources import files

    names = sorted(p.name for p in files("chipo.lab").joinpath("templates").iterdir() if p.name.endswith(".md"))
    assert names == ["offline_analysis.md", "offline_summary.md", "online_section.md", "online_settings.md",
                     "rlhf_axes.md", "rlhf_inference.md", "rlhf_rl.md"]
    values = {"k": 4, "prompts_per_step": 16, "steps": 300, "learning_rate": 0.001, "betas": [0.05], "eval_every": 25,
              "eval_samples": 32, "pool": 528, "prompts": 16, "ns": [1, 2], "r_max": "1.00", "link": "../online",
              "scale": 5, "max_new_tokens": 8, "alpha": 1e-5, "seeds": 3, "budget": 384}
    for name in names:
        text = experiments.template(name.removesuffix(".md"), **values)
        assert text and not text.endswith("\n") and "$" not in text
    with pytest.raises(KeyError):
        experiments.template("rlhf_rl")  # a missing value is an error, not a gap in the report
    assert "Huang et al. 2024" in experiments.template("offline_summary")
    assert "Limits of this world" in experiments.template("offline_analysis")
