"""chipo.markdown.markdown_table against tables written by hand."""

import pytest

from chipo.markdown import markdown_table


def test_table_by_hand():
    """Header row, one '---' per column, cells as str() of the values, no trailing newline."""
    assert markdown_table(["method", "beta", "gold"], [["dpo", 0.05, "0.41"], ["chipo", 0.005, 1]]) == (
        "| method | beta | gold |\n"
        "|---|---|---|\n"
        "| dpo | 0.05 | 0.41 |\n"
        "| chipo | 0.005 | 1 |")


def test_header_only_and_generator_rows():
    assert markdown_table(["a"], []) == "| a |\n|---|"
    assert markdown_table(("x", "y"), ((i, i * i) for i in range(2))) == "| x | y |\n|---|---|\n| 0 | 0 |\n| 1 | 1 |"


def test_pipe_and_newline_cannot_break_columns():
    """'a|b' would be two columns; a newline would end the row."""
    assert markdown_table(["k"], [["a|b"], ["two\nlines"]]) == "| k |\n|---|\n| a\\|b |\n| two lines |"


def test_row_of_wrong_width_names_the_row():
    with pytest.raises(ValueError, match="row 1 has 1 cells for 2 columns"):
        markdown_table(["a", "b"], [[1, 2], [3]])
    with pytest.raises(ValueError, match="at least one column"):
        markdown_table([], [])
