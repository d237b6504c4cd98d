"""The testbed's report tables on results written by hand."""

from chipo.bandit.reports import report_bench
from markdown_checks import assert_tables_well_formed


def test_bench_table_by_hand_keeps_four_columns():
    """seconds 0.0031 -> '0.003' (.3f), error 3.3e-16 -> '3.3e-16' (.1e), beta 1.0 -> '1' (:g); the header's
    'max |row sum - 1|' is written with escaped pipes, so it is one column of four, not three more."""
    results = {"size": 3, "rows": [{"divergence": "kl", "beta": 1.0, "seconds_min": 0.0031,
                                    "max_row_sum_error": 3.3e-16}]}
    text = report_bench(results)
    assert text == ("# regularized_optimum benchmark (3 contexts x 3 actions, float64, this machine)\n\n"
                    "| divergence | beta | seconds (best of runs) | max \\|row sum - 1\\| |\n"
                    "|---|---|---|---|\n"
                    "| kl | 1 | 0.003 | 3.3e-16 |\n")
    assert assert_tables_well_formed(text) == 1
