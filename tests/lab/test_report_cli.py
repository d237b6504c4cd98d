"""The report from results rows, and the `chipo lab` commands with a gold reward model and data given by path."""

from __future__ import annotations

import json
import re

import pytest

from chipo.cli.lab import main
from chipo.lab import tables
from chipo.lab.report import write_report
from chipo.lab.report_paper import PAPER, table1
from markdown_checks import assert_tables_well_formed


def _rows(losses=("dpo", "chipo")):
    rows = [{"loss": "pi_ref", "beta": None, "seed": None, "epoch": 0, "win_rate_vs_ref": 0.5, "gold_mean": 0.4,
             "kl_k3": 0.0, "kl_k1": 0.0, "chi2_mc": 0.0, "length_mean": 4.0, "n_prompts": 2, "n_samples": 8,
             "examples": [{"prompt": "t0 s0", "response": "a b", "gold": 0.5}]}]
    for seed in (0, 1, 2):
        for beta in (0.1, 0.01):
            for epoch in (1, 2, 4):
                for loss, drop in zip(losses, (0.1, 0.01)):
                    jitter = 0.002 * ((7 * seed + 3 * epoch) % 5)  # so per-seed differences vary
                    win = 0.6 - drop * epoch + 0.01 * seed + jitter + (0.003 * seed * seed if loss == losses[0]
                                                                       else 0.0)
                    rows.append({"loss": loss, "beta": beta, "seed": seed, "epoch": epoch, "win_rate_vs_ref": win,
                                 "gold_mean": win - 0.1, "kl_k3": epoch * (2.0 if loss == losses[0] else 1.0),
                                 "kl_k1": epoch, "chi2_mc": 10.0 * epoch, "length_mean": 4.0,
                                 "implicit_acc": 0.6, "train_acc": 0.7, "n_prompts": 2, "n_samples": 8})
    return rows


def _sweep(tmp_path, rows):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sweep


def test_report_writes_markdown_plots_and_raw_results(tmp_path):
    sweep = _sweep(tmp_path, _rows())
    report = write_report(sweep, meta={"machine": {"machine": "test box"}, "timing": {"wall time": "1 s"}},
                          extra=PAPER)
    out = report.parent
    for name in ("report.md", "winrate_vs_epochs.png", "gold_vs_sqrt_kl.png", "divergence_vs_epochs.png",
                 "results.json", "results.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    text = report.read_text()
    assert "test box" in text and "Table 1" in text and "chiPO vs DPO" in text
    # Table 1, the verdicts, the frontier at each of the 2 betas, per seed, all metrics (no mass or off-support
    # columns in these rows, so no mass table and no monitor tables).
    assert assert_tables_well_formed(text) == 6
    # Mean over the three seeds at beta 0.01, epoch 4 (jitter 0.004, 0.008, 0.002: mean 0.00467):
    # chiPO 0.6 - 0.04 + 0.01 + 0.00467 = 57.5%, DPO 0.6 - 0.4 + 0.01 + 0.00467 + 0.003 * 5/3 = 22.0%.
    assert "57.5 vs 22.0" in text
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == len(_rows()) and data["claims"]
    # Every claim's word follows its Holm-adjusted test; a statement only for passed claims.
    for c in data["claims"]:
        assert (c["statement"] is not None) == c["passed"] == (c["p_adjusted"] <= 0.05)
    # DPO falls by 0.1 per epoch at both betas: its fall from epochs 1/2 to 4 is a finding.
    assert any(c["passed"] and c["claim"].startswith("dpo: gold win rate vs pi_ref falls") for c in data["claims"])
    # Rewriting replaces the report atomically (no stale temporary directories left behind).
    write_report(sweep)
    assert sorted(p.name for p in tmp_path.joinpath("sweep").iterdir()) == ["report", "results.jsonl"]


def test_the_generic_report_knows_no_loss_by_name(tmp_path):
    """Any methods (here ipo and hinge): verdicts compare them, no paper table, no hard-coded names."""
    report = write_report(_sweep(tmp_path, _rows(("ipo", "hinge"))))
    text = report.read_text()
    assert "Table 1" not in text and "chiPO" not in text and "DPO" not in text
    assert assert_tables_well_formed(text) == 5  # as above, without Table 1
    assert "hinge vs ipo: gold win rate vs pi_ref at epoch 4, beta 0.1" in text
    assert not re.search(r"the seed(?!s)|field notes", text, re.IGNORECASE)


def test_table1_layout():
    df = tables.results_table(_rows())
    text = table1(df, tables.headline(df))
    lines = text.splitlines()
    assert lines[0].startswith("| beta | epochs 1 (chiPO vs DPO) | 2 | 4 |")
    assert lines[2].startswith("| 0.1 |") and lines[3].startswith("| 0.01 |")


@pytest.mark.parametrize("command", ["demo", "generate-prefs", "evaluate", "sweep", "report"])
def test_every_subcommand_has_help(command, capsys):
    from chipo.cli.lab import demo

    with pytest.raises(SystemExit) as exit_info:
        demo(["--help"]) if command == "demo" else main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage" in text and "config keys" in text


def test_generate_prefs_and_evaluate_with_a_reward_model_and_data_by_path(tiny_world, tiny_reward_model, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    code = main(["generate-prefs", f"policy={tiny_world / 'pi_ref'}", f"prompts={tiny_world / 'prompts_eval.jsonl'}",
                 f"gold={tiny_reward_model}", "pairs_per_prompt=3", "scale=2", "max_new_tokens=4", f"out={prefs}"])
    assert code == 0
    rows = [json.loads(line) for line in prefs.open()]
    assert rows and {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"} <= set(rows[0])
    meta = json.loads((tmp_path / "prefs.jsonl.meta.json").read_text())
    assert meta["settings"]["gold"].startswith("rm:") and meta["settings"]["scale"] == 2.0

    out = tmp_path / "eval.json"
    code = main(["evaluate", f"policy={tiny_world / 'pi_ref'}", f"ref={tiny_world / 'pi_ref'}",
                 f"prompts={tiny_world / 'prompts_eval.jsonl'}", f"gold={tiny_reward_model}", f"heldout_prefs={prefs}",
                 "loss=dpo", "beta=0.1", "num_samples=4", "max_new_tokens=4", f"out={out}"])
    assert code == 0
    metrics = json.loads(out.read_text())
    for key in ("gold_mean", "gold_se", "win_rate_vs_ref", "win_rate_vs_reference", "kl_k1", "kl_k3", "chi2_mc",
                "length_mean", "implicit_acc", "sampling"):
        assert key in metrics, key
    assert metrics["kl_k1"] == pytest.approx(0.0, abs=1e-5)  # the policy is pi_ref itself
    assert metrics["implicit_acc"] == 0.5
    assert "exact" not in metrics  # a reward model has no enumerable response space


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    code = main(["generate-prefs", f"policy={tmp_path / 'nope'}", f"prompts={tmp_path / 'none.jsonl'}",
                 f"out={tmp_path / 'x.jsonl'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("chipo: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_sweep_command_with_the_real_trainer_a_reward_model_and_data_by_path(tiny_world, tiny_reward_model,
                                                                               tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", f"ref_model={tiny_world / 'pi_ref'}", f"train_prefs={tiny_world / 'prefs.jsonl'}",
            f"eval_prompts={tiny_world / 'prompts_eval.jsonl'}", f"heldout_prefs={tiny_world / 'prefs.jsonl'}",
            f"gold={tiny_reward_model}", "gold_template={prompt} {response}", "losses=dpo,chipo", "betas=0.1",
            "seeds=0", "epochs=2", "num_samples=4", "max_new_tokens=4", "max_length=16", f"out_dir={out}",
            "--report"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").open()]
    assert sorted((r["loss"], r["epoch"]) for r in rows) == [("chipo", 1), ("chipo", 2), ("dpo", 1), ("dpo", 2),
                                                             ("pi_ref", 0)]
    trained = next(r for r in rows if r["loss"] == "chipo" and r["epoch"] == 2)
    assert trained["step"] > 0 and trained["kl_k1"] != 0.0  # the real trainer moved the policy
    assert (out / "report" / "report.md").is_file() and (out / "report" / "winrate_vs_epochs.png").is_file()
    # A rerun finds every cell finished.
    assert main(argv) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)
