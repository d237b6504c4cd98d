"""The TL;DR report's tables on hand-built inputs: cells from the user's paths cannot break a table."""

import json

from chipo.recipes.tldr.layout import Layout
from chipo.recipes.tldr.report import measured_times
from markdown_checks import assert_tables_well_formed


def test_measured_times_by_hand_with_a_pipe_in_the_sft_path(tmp_path):
    """An SFT run of 7200 s is 7200 / 3600 = 2.000 h; no sweep runs (no done.json), no cells: generate and judge
    took 0 s, on no device. The SFT directory's name holds '|', written '\\|' so the row keeps 3 columns."""
    sft = tmp_path / "sft|v2"
    sft.mkdir()
    (sft / "metrics.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n" + json.dumps({"train_runtime": 7200.0}) + "\n")
    table = measured_times(Layout(tmp_path / "recipe"), [], str(sft))
    assert table == ("| stage | measured wall-clock | where |\n"
                     "|---|---|---|\n"
                     f"| sft | 2.000 h (7200 s) | {tmp_path}/sft\\|v2 |\n"
                     "| generate (0 cells) | 0.000 h (0 s) |  |\n"
                     "| judge | 0.000 h (0 s) |  |")
    assert assert_tables_well_formed(table) == 1
