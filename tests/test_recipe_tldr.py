"""The TL;DR recipe end to end on CPU: every stage through ``chipo tldr`` with the recipe's own YAML configs.

Stand-ins for what needs the hub: a tiny random Llama (``chipo.toy``) for Pythia, a tiny random reward model
(``AutoModelForSequenceClassification``) as the judge, and a few rows written in exactly the column layouts of
``trl-lib/tldr`` (prompt, completion) and ``trl-lib/tldr-preference`` (prompt, chosen, rejected), as local
directories of split files. The numbers mean nothing; the test checks that every stage runs, resumes without
redoing work, handles a judge's failures, and that the report holds the tables and plots.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from chat_server import ChatServer
from chipo.cli.main import main
from markdown_checks import assert_tables_well_formed

RECIPE = Path(__file__).resolve().parents[1] / "src" / "chipo" / "recipes" / "tldr" / "configs"
WORDS = "cat dog model policy reward summary post answer question mat good bad short long".split()


def _post(i: int, marker: str = "") -> str:
    words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(6 + i % 5))
    return (f"SUBREDDIT: r/relationships\n\nTITLE: my {WORDS[i % len(WORDS)]} question {marker}\n\n"
            f"POST: {words}.\n\nTL;DR:")


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _data(root: Path) -> tuple[Path, Path]:
    """trl-lib/tldr (train/test) and trl-lib/tldr-preference (train/validation) stand-ins."""
    tldr, prefs = root / "tldr", root / "tldr-preference"
    _write(tldr / "train.jsonl", [{"prompt": _post(i), "completion": f" good short summary of the {WORDS[i]}."}
                                  for i in range(8)])
    # Markers script the fake LLM judge's behaviour per post (see FakeJudgeServer).
    markers = ["", "", "MALFORMED", "DOWN"]
    _write(tldr / "test.jsonl", [{"prompt": _post(20 + i, m), "completion": " a short summary."}
                                 for i, m in enumerate(markers)])
    _write(prefs / "train.jsonl", [{"prompt": _post(i), "chosen": " good helpful summary.",
                                    "rejected": " bad " * (1 + i % 3) + "summary."} for i in range(8)])
    _write(prefs / "validation.jsonl", [{"prompt": _post(9), "chosen": " good.", "rejected": " bad."}])
    return tldr, prefs


def _reward_model(directory: Path) -> None:
    """A tiny random Llama sequence classifier with one output, saved with the policy's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from chipo.toy import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def tldr(*args) -> int:
    return main(["tldr", *map(str, args)])


SMALL_TRAIN = ["per_device_train_batch_size=4", "gradient_accumulation_steps=1", "bf16=false",
               "gradient_checkpointing=false", "max_length=256", "max_prompt_length=192"]


@pytest.mark.slow
def test_tldr_recipe_end_to_end_on_cpu(tmp_path, capsys):
    """One test, not several sharing a fixture: under pytest-xdist a shared module fixture would run once per
    worker. The steps are the helpers below, in order."""
    recipe = run_recipe(tmp_path)
    check_outputs_and_report(recipe)
    check_the_report_never_clears_other_files(recipe, capsys)
    check_rerunning_every_stage_does_no_work(recipe, capsys)
    check_changed_settings_are_refused_not_mixed(recipe, capsys)
    check_llm_judge_failures_are_counted_flagged_and_retried(recipe, capsys)


def run_recipe(root: Path) -> dict:
    """sft -> sweep -> generate -> judge (reward model) -> report, each through the CLI with the recipe's YAML."""
    from chipo.toy import save_tiny_model

    save_tiny_model(root / "pythia-stand-in")
    _reward_model(root / "rm")
    tldr_data, prefs = _data(root)
    out = root / "runs"
    assert tldr("sft", "--config", RECIPE / "sft.yaml", f"model={root / 'pythia-stand-in'}", f"dataset={tldr_data}",
                f"output_dir={out / 'sft'}", "learning_rate=1e-3", "report_to=none", "disable_tqdm=true",
                *SMALL_TRAIN) == 0
    assert tldr("sweep", "--config", RECIPE / "sweep.yaml", f"out_dir={out}", f"sft_model={out / 'sft'}",
                f"dataset={prefs}", "seeds=[0]", "epochs=2", "eval_epochs=[1,2]", "learning_rate=1e-3",
                "train_overrides=[disable_tqdm=true]", *SMALL_TRAIN) == 0
    assert tldr("generate", "--config", RECIPE / "generate.yaml", f"out_dir={out}", f"prompts_dataset={tldr_data}",
                "num_prompts=4", "max_new_tokens=8", "batch_size=4", "backend=hf", "dtype=float32",
                "max_prompt_length=192") == 0
    assert tldr("judge", "--config", RECIPE / "judge.yaml", f"out_dir={out}", "judge=reward-model",
                f"reward_model.model={root / 'rm'}") == 0
    assert tldr("report", "--config", RECIPE / "report.yaml", f"out_dir={out}") == 0
    return {"root": root, "out": out, "tldr": tldr_data, "prefs": prefs}


def check_outputs_and_report(recipe: dict) -> None:
    out = recipe["out"]
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["chipo_beta0.005_seed0", "chipo_beta0.05_seed0", "dpo_beta0.005_seed0", "dpo_beta0.05_seed0"]
    # One reference log-prob computation shared by the four runs.
    assert len(list((out / "ref_cache").glob("*.safetensors"))) == 1
    done = json.loads((out / "runs" / "dpo_beta0.05_seed0" / "done.json").read_text())
    assert done["checkpoints"]["2"] == "." and (out / "runs" / "dpo_beta0.05_seed0" / done["checkpoints"]["1"]).is_dir()
    assert not list((out / "runs").glob("*/checkpoint-*/optimizer.pt"))  # pruned once the run finished

    meta = json.loads((out / "generations" / "chipo_beta0.05_seed0_epoch2.json").read_text())
    assert meta["n"] == 4 and meta["sampling"] == {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0,
                                                   "top_k": 0, "seed": 0, "max_prompt_length": 192}
    assert meta["prompts"]["rows"] == "first 4" and len(meta["prompts"]["sha256"]) == 64
    assert meta["kl_k3"] >= 0
    sft = json.loads((out / "generations" / "sft_epoch0.json").read_text())
    assert sft["kl_k1"] == 0.0 and sft["kl_k3"] == 0.0  # pi_ref against itself
    result = json.loads((out / "judgements" / "reward-model" / "dpo_beta0.005_seed0_epoch1.json").read_text())
    assert result["n"] == 4 and result["valid"] == 4 and 0.0 <= result["win_rate"] <= 1.0

    report = out / "report"
    text = (report / "report.md").read_text()
    assert assert_tables_well_formed(text) == 5  # Table 1, KL, per seed, the GPU-time estimate, the measured times
    table = (report / "table1.md").read_text().splitlines()
    assert table[0] == "| beta | epochs 1 (chiPO vs DPO) | 2 |"
    assert [line.split("|")[1].strip() for line in table[2:]] == ["0.05", "0.005"]
    for line in table[2:]:  # every cell "x ± s† vs y ± s†" with numbers (one seed: the judge's s.e.)
        for cell in line.split("|")[2:-1]:
            chipo, dpo = cell.split(" vs ")
            assert all(float(side.split(" ± ")[0]) >= 0 for side in (chipo, dpo)), cell
    assert "KL(pi || pi_ref)" in text and "| DPO | 0.05 |" in (report / "kl.md").read_text()
    for png in ("winrate_vs_epochs.png", "kl_vs_epochs.png"):
        assert (report / png).stat().st_size > 5000 and f"![{png}]({png})" in text
    assert "chipo tldr sweep --config" in text and "chipo tldr report --config" in text  # the exact commands
    assert "GPU hours" in text and "| sweep: training (4 runs) |" in text
    rows = json.loads((report / "results.json").read_text())["rows"]
    assert len(rows) == 4 * 2 + 1 and all(r["judged"] for r in rows)


def check_the_report_never_clears_other_files(recipe: dict, capsys) -> None:
    """The report directory replaces only an earlier report's files: a folder of the user's keeps its own, and the
    recipe directory itself (a sweep's) is refused rather than cleared."""
    out, mine = recipe["out"], recipe["root"] / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for _ in range(2):
        assert tldr("report", "--config", RECIPE / "report.yaml", f"out_dir={out}", f"output_dir={mine}") == 0
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "report.md").is_file()
    assert not [p for p in mine.iterdir() if p.name.startswith(".final-")]
    capsys.readouterr()
    assert tldr("report", "--config", RECIPE / "report.yaml", f"out_dir={out}", f"output_dir={out}") == 2
    err = capsys.readouterr().err
    assert f"output_dir {out} holds a TL;DR sweep" in err and err.count("\n") == 1
    assert (out / "runs").is_dir() and (out / "generations").is_dir() and not (out / "report.md").exists()


def check_rerunning_every_stage_does_no_work(recipe: dict, capsys) -> None:
    capsys.readouterr()
    out, root = recipe["out"], recipe["root"]
    stamps = {p: p.stat().st_mtime_ns for p in [*out.rglob("done.json"), *out.rglob("generations/*.json"),
                                               *out.rglob("judgements/*/*.json")]}
    assert tldr("sft", "--config", RECIPE / "sft.yaml", f"model={root / 'pythia-stand-in'}",
                f"dataset={recipe['tldr']}", f"output_dir={out / 'sft'}", "report_to=none", *SMALL_TRAIN) == 0
    assert tldr("sweep", "--config", RECIPE / "sweep.yaml", f"out_dir={out}", f"sft_model={out / 'sft'}",
                f"dataset={recipe['prefs']}", "seeds=[0]", "epochs=2", "eval_epochs=[1,2]", "learning_rate=1e-3",
                "train_overrides=[disable_tqdm=true]", *SMALL_TRAIN) == 0
    assert tldr("generate", "--config", RECIPE / "generate.yaml", f"out_dir={out}",
                f"prompts_dataset={recipe['tldr']}", "num_prompts=4", "max_new_tokens=8", "max_prompt_length=192",
                "backend=hf") == 0
    assert tldr("judge", "--config", RECIPE / "judge.yaml", f"out_dir={out}", "judge=reward-model",
                f"reward_model.model={root / 'rm'}", "reward_model.batch_size=2") == 0  # operational: no re-judge
    printed = capsys.readouterr().out
    assert "SFT model already trained" in printed
    assert "0 run(s) trained, 4 already done" in printed
    assert "0 cell(s) sampled, 9 already done" in printed
    assert "0 cell(s) judged, 9 already done" in printed
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def check_changed_settings_are_refused_not_mixed(recipe: dict, capsys) -> None:
    capsys.readouterr()
    out = recipe["out"]
    code = tldr("sweep", "--config", RECIPE / "sweep.yaml", f"out_dir={out}", f"sft_model={out / 'sft'}",
                f"dataset={recipe['prefs']}", "seeds=[0]", "epochs=2", "eval_epochs=[1,2]", "learning_rate=5e-4",
                "train_overrides=[disable_tqdm=true]", *SMALL_TRAIN)
    err = capsys.readouterr().err
    assert code == 2 and "other settings (learning_rate)" in err and err.count("\n") == 1
    code = tldr("generate", "--config", RECIPE / "generate.yaml", f"out_dir={out}",
                f"prompts_dataset={recipe['tldr']}", "num_prompts=4", "max_new_tokens=9", "max_prompt_length=192")
    err = capsys.readouterr().err
    assert code == 2 and "generate stage with other settings (max_new_tokens): max_new_tokens was 8" in err
    assert "overwrite=true" in err and err.count("\n") == 1


class FakeJudgeServer(ChatServer):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that always prefers the first summary shown, except:
    posts marked MALFORMED get an unparseable reply, posts marked DOWN get HTTP 503."""

    def __init__(self):
        self.requests = 0
        super().__init__()

    def respond(self, path, headers, body):
        text = body["messages"][-1]["content"]
        with self.lock:
            self.requests += 1
        status, reply = (503, None) if "DOWN" in text else \
            (200, "I cannot tell.") if "MALFORMED" in text else (200, "Both are fine.\nPreferred: A")
        return status, {}, {"choices": [{"message": {"content": reply}}]} if reply else {}


def check_llm_judge_failures_are_counted_flagged_and_retried(recipe: dict, capsys) -> None:
    capsys.readouterr()
    out, server = recipe["out"], FakeJudgeServer()
    try:
        args = ["judge", "--config", RECIPE / "judge.yaml", f"out_dir={out}", "tag=fake-llm",
                f"openai.base_url={server.url}", "openai.model=fake", "openai.max_attempts=1",
                f"openai.cache={recipe['root'] / 'judge_cache.sqlite'}"]
        assert tldr(*args) == 0
        assert "9 flagged for missing verdicts" in capsys.readouterr().out
        result = json.loads((out / "judgements" / "fake-llm" / "sft_epoch0.json").read_text())
        # 4 posts: 2 verdicts, 1 malformed reply, 1 failed request; the win rate is over the 2 verdicts only.
        assert (result["n"], result["valid"], result["malformed"], result["errors"]) == (4, 2, 1, 1)
        assert result["win_rate"] is not None and result["flagged"]
        details = (out / "judgements" / "fake-llm" / "sft_epoch0.details.jsonl").read_text().splitlines()
        # "cached": another cell had the very same summary (the tiny policies barely move), so no second request.
        statuses = sorted(json.loads(x)["status"].replace("cached", "ok") for x in details)
        assert statuses == ["error", "malformed", "ok", "ok"]

        # A rerun re-judges only the cells with failed requests, and sends only the failed requests again
        # (verdicts and malformed replies come from the cache).
        first = server.requests
        assert tldr(*args) == 0
        assert "9 cell(s) judged, 0 already done" in capsys.readouterr().out
        assert server.requests - first == 9

        assert tldr("report", "--config", RECIPE / "report.yaml", f"out_dir={out}", "tag=fake-llm",
                    f"output_dir={recipe['root'] / 'report-llm'}") == 0
        text = (recipe["root"] / "report-llm" / "report.md").read_text()
        assert "malformed replies: 9; failed requests: 9" in text and "sft_epoch0" in text
        assert "* vs" in (recipe["root"] / "report-llm" / "table1.md").read_text()  # flagged cells marked
    finally:
        server.stop()

    # Two judges' results now exist: the report asks which one instead of guessing.
    assert tldr("report", "--config", RECIPE / "report.yaml", f"out_dir={out}") == 2
    assert "several judges" in capsys.readouterr().err

    # A judge that cannot work at all (nothing listens there): one line, exit 2, no results written.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    assert tldr("judge", "--config", RECIPE / "judge.yaml", f"out_dir={out}", "tag=dead",
                f"openai.base_url=http://127.0.0.1:{dead}/v1", "openai.model=fake", "openai.max_attempts=1",
                "openai.cache=null") == 2
    err = capsys.readouterr().err
    assert err.startswith("chipo: error: judge openai:fake") and "connection refused" in err
    assert not (out / "judgements" / "dead").exists()  # a stage that wrote nothing leaves no directory


def test_recipe_configs_parse_and_validate():
    """Every YAML in recipes/tldr/ is a valid config of its stage (no hub access needed to check that)."""
    from chipo.config import load_config
    from chipo.recipes.tldr.config import GenerateStageConfig, ReportStageConfig, SweepStageConfig, load_judge_stage
    from chipo.train.sft_config import SFTConfig

    assert load_config(SFTConfig, RECIPE / "sft.yaml").model == "EleutherAI/pythia-2.8b-deduped"
    sweep = load_config(SweepStageConfig, RECIPE / "sweep.yaml")
    assert (sweep.losses, sweep.betas, sweep.seeds, sweep.epochs, sweep.eval_epochs) == \
        (["dpo", "chipo"], [0.05, 0.005], [0, 1, 2], 4, [1, 2, 4])
    assert load_config(GenerateStageConfig, RECIPE / "generate.yaml").num_prompts == 512
    stage, judge = load_judge_stage(str(RECIPE / "judge.yaml"), [])
    assert stage.judge == "openai" and judge.max_concurrency == 16
    stage, judge = load_judge_stage(str(RECIPE / "judge.yaml"), ["judge=reward-model", "reward_model.model=rm"])
    assert stage.tag == "reward-model" and judge.model == "rm"
    assert load_config(ReportStageConfig, RECIPE / "report.yaml").mfu == 0.4


@pytest.mark.parametrize("stage, override, needle", [
    ("sweep", "train_overrides=[loss=ipo]", "train_overrides may not set loss"),
    ("sweep", "eval_epochs=[8]", "eval_epochs must be non-empty and lie in [1, epochs=4]"),
    ("sweep", "bettas=[0.1]", "did you mean 'betas'"),
    ("generate", "backend=tpu", "backend must be one of"),
    ("judge", "openai.max_attempts=0", "openai: max_attempts must be at least 1"),
    ("judge", "judge=gpt", "judge must be one of"),
])
def test_config_errors_are_one_line(stage, override, needle, capsys, tmp_path):
    code = tldr(stage, "--config", RECIPE / f"{stage}.yaml", f"out_dir={tmp_path}", override)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_cost_estimate_follows_the_stated_formula():
    """6 N per trained token: per run 6 N x pairs x 2 sequences x (P + R) tokens x epochs, at peak x MFU."""
    from chipo.recipes.tldr.cost import CostAssumptions, estimate

    a = CostAssumptions(pref_pairs=1000, prompt_tokens=90, response_tokens=10, runs=2, epochs=3,
                        gpu_peak_tflops=100.0, mfu=0.5)
    rows = {r.stage: r for r in estimate(a, 1e9)[0]}
    flops = 6 * 1e9 * 1000 * 2 * 100 * 3 * 2
    assert rows["sweep: training (2 runs)"].flops == pytest.approx(flops)
    assert rows["sweep: training (2 runs)"].gpu_hours == pytest.approx(flops / (100e12 * 0.5) / 3600)
    assert rows["sweep: reference log-probs (once)"].flops == pytest.approx(2 * 1e9 * 1000 * 2 * 100)


def test_report_standard_errors_are_over_seeds_when_there_are_several(tmp_path):
    """Two seeds: mean and s.e. of the per-seed win rates (no dagger); the SFT row is epoch 0 of every curve."""
    from chipo.io import write_json
    from chipo.recipes.tldr.config import ReportStageConfig
    from chipo.recipes.tldr.layout import SFT, Cell, Layout
    from chipo.recipes.tldr.report import write_report

    layout = Layout(tmp_path)
    wins = {("chipo", 0): 0.6, ("chipo", 1): 0.8, ("dpo", 0): 0.4, ("dpo", 1): 0.4}
    cells = [(SFT, 0.5)] + [(Cell(loss, 0.05, seed, 1), w) for (loss, seed), w in wins.items()]
    for cell, win in cells:
        write_json(layout.generation(cell)[1], {**cell.as_dict(), "sampling": {"temperature": 1.0, "seed": 0},
                                                "prompts": {"n": 10, "rows": "first 10"}, "n": 10,
                                                "kl_k3": 0.0 if cell is SFT else 1.0 + win, "kl_k3_se": 0.1,
                                                "seconds": 1.0})
        write_json(layout.judgement("rm", cell)[0], {**cell.as_dict(), "win_rate": win, "stderr": 0.15,
                                                      "judge": "rm", "valid": 10, "malformed": 0, "errors": 0,
                                                      "invalid_frac": 0.0, "seconds": 1.0})
    path = write_report(ReportStageConfig(out_dir=str(tmp_path), model_params=1e9))
    table = (path.parent / "table1.md").read_text().splitlines()
    assert table[2] == "| 0.05 | 70.0 ± 10.0 vs 40.0 ± 0.0 |"
    assert "SFT model (pi_ref, epoch 0): 50.0 ± 15.0†." in path.read_text()
    assert "| chiPO | 0.05 | 0 ± 0.1† | 1.7 ± 0.1 |" in (path.parent / "kl.md").read_text()
