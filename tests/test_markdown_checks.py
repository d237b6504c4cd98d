"""The report tests' table check (tests/markdown_checks.py) on tables written by hand, broken and sound."""

import pytest

from chipo.markdown import markdown_table
from markdown_checks import assert_tables_well_formed, cells


def test_cells_split_at_unescaped_pipes_only():
    assert cells("| a | b\\|c |  |") == [" a ", " b\\|c ", "  "]


def test_a_pipe_in_a_hand_built_header_is_caught_and_the_helper_escapes_it():
    """The bandit benchmark's header as it was built by hand: 'max |row sum - 1|' made 6 header cells (its two pipes
    split it into 'max ', 'row sum - 1' and ' ') over a 4-column rule."""
    broken = "| divergence | beta | seconds | max |row sum - 1| |\n|---|---|---|---|\n| kl | 1 | 0.003 | 3.3e-16 |"
    with pytest.raises(AssertionError, match="no rule of 6 columns"):
        assert_tables_well_formed(broken)
    fixed = markdown_table(["divergence", "beta", "seconds", "max |row sum - 1|"], [["kl", 1, "0.003", "3.3e-16"]])
    assert assert_tables_well_formed("text\n\n" + fixed + "\n\nmore text\n\n" + fixed) == 2


def test_a_short_row_is_caught():
    with pytest.raises(AssertionError, match="2 cells for 3 columns"):
        assert_tables_well_formed("| a | b | c |\n|---|---|---|\n| 1 | 2 |")
