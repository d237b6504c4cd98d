"""End to end: ``chipo bandit all --quick`` writes reports, PNGs and JSON with numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

from chipo.cli.bandit import main
from markdown_checks import assert_tables_well_formed


def test_all_quick(tmp_path: Path) -> None:
    out = tmp_path / "res"
    assert main(["all", "--quick", f"out={out}"]) == 0
    top = (out / "report.md").read_text()
    assert re.search(r"violations: \*\*0\*\*", top)
    n_tables = 0
    for name, pngs in {"regret": ["regret_kl_trap.png", "regret_random.png"], "bound": ["bound.png"],
                       "overopt": ["overopt_kl_trap.png", "overopt_random.png"], "bench": ["bench.png"],
                       "online": ["online.png"]}.items():
        d = out / name
        report = (d / "report.md").read_text()
        assert re.search(r"\d\.\d", report), name
        part_tables = assert_tables_well_formed(report)
        assert part_tables >= 1, name  # every part has a table
        n_tables += part_tables
        for png in pngs:
            assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        results = json.loads((d / "results.json").read_text())
        assert results["wall_seconds"] > 0
    assert assert_tables_well_formed(top) == n_tables  # the summary holds every part's tables
    regret = json.loads((out / "regret" / "results.json").read_text())
    for fam in regret["families"].values():
        for rec in fam["methods"].values():
            assert all(0.0 <= v <= 2.0 for v in rec["mean"])  # regret lies in [0, max reward]
    bound = json.loads((out / "bound" / "results.json").read_text())
    assert bound["violations"] == 0 and bound["n_checks"] > 100
    online = json.loads((out / "online" / "results.json").read_text())
    for rec in online["methods"].values():
        assert len(rec["regret_mean"]) == online["rounds"] + 1
        assert all(0.0 <= v <= 1.0 for v in rec["regret_mean"])  # rare_best rewards lie in [0, 1]
    assert "sanity check" in (out / "bound" / "report.md").read_text()
    assert not list(out.glob(".*"))  # no temporary directories left behind


def test_bad_arguments() -> None:
    assert main(["nonsense"]) == 2  # not an experiment, not key=value: one line, exit 2
    assert main(["experiment=nonsense"]) == 2
    assert main(["bound", "seeds=0"]) == 2
    assert main(["regret", "kl_trap_n=100,abc"]) == 2
    assert main(["regret", "kl_trap_n=1"]) == 2
