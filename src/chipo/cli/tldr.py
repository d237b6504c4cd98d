"""``chipo tldr <stage> [--config FILE] key=value ...``: the TL;DR recipe, one stage a command.

Without ``--config`` a stage reads the recipe's own YAML, shipped in the package
(``chipo/recipes/tldr/configs/<stage>.yaml``); ``key=value`` overrides it.

Every stage is resumable (it skips the work already on disk), prints one summary line, and records its command
line in the recipe directory's ``commands.log`` (the SFT stage: in its output directory) for the report.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from chipo.cli.main import build_parser, run_guarded
from chipo.config import ConfigError, cli_overrides, config_help, load_config


@dataclass(frozen=True)
class Stage:
    help: str
    example: str


STAGES = {
    "sft": Stage("Supervised fine-tuning of the base model on trl-lib/tldr (chipo sft's keys); skipped when done.",
                 "chipo tldr sft"),
    "sweep": Stage("Preference training: a run per (loss, beta, seed), a checkpoint per epoch, reference log-probs "
                   "once.", "chipo tldr sweep seeds=[0]"),
    "generate": Stage("Sample one summary per test prompt from every kept checkpoint and the SFT model; KL to pi_ref.",
                      "chipo tldr generate num_prompts=512"),
    "judge": Stage("Win rate of every cell's summaries against the reference summaries (LLM or reward model).",
                   "chipo tldr judge openai.model=gpt-4o"),
    "report": Stage("Table 1 layout, KL per cell, plots, GPU time and commands: <out_dir>/report/report.md.",
                    "chipo tldr report"),
    "cost": Stage("Print the GPU-time estimate from FLOPs for a model size and the stated assumptions.",
                  "chipo tldr cost model_params=1.0e9"),
}


def _usage() -> str:
    lines = ["usage: chipo tldr <stage> [--config FILE] [key=value ...]   (chipo tldr <stage> --help)", "",
             "The paper's TL;DR experiment (recipes/tldr/README.md). Stages, in order:"]
    lines += [f"  {name:<9} {stage.help}" for name, stage in STAGES.items()]
    return "\n".join(lines)


def packaged_config(stage: str) -> Path:
    """The recipe's own YAML for ``stage``, shipped inside the package."""
    from importlib.resources import files

    return Path(str(files("chipo.recipes.tldr") / "configs" / f"{stage}.yaml"))


def _config_class(name: str):
    from chipo.recipes.tldr import config as c

    if name == "sft":
        from chipo.train.sft_config import SFTConfig

        return SFTConfig
    return {"sweep": c.SweepStageConfig, "generate": c.GenerateStageConfig, "judge": c.JudgeStageConfig,
            "report": c.ReportStageConfig, "cost": c.CostAssumptions}[name]


def _epilog(name: str) -> str:
    text = f"example:\n  {STAGES[name].example}\n\nconfig keys (YAML file and/or key=value or --key value):\n"
    text += config_help(_config_class(name))
    if name == "judge":
        from chipo.judges import OpenAIJudgeConfig, RewardModelJudgeConfig

        text += ("\n\njudge=openai: keys of the `openai:` section (or openai.<key>=value):\n"
                 + config_help(OpenAIJudgeConfig)
                 + "\n\njudge=reward-model: keys of the `reward_model:` section (or reward_model.<key>=value):\n"
                 + config_help(RewardModelJudgeConfig))
    return text


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"chipo: error: unknown tldr stage {name!r}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    parser = build_parser(f"chipo tldr {name}", STAGES[name].help, _epilog(name))
    parser.add_argument("--config", help="YAML file of config keys (overridden by key=value arguments); default: "
                                         "the recipe's own, chipo/recipes/tldr/configs/<stage>.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    try:
        normalized = cli_overrides(rest, _config_class(name))  # also --key value, --key=value, --flag
    except ConfigError as e:
        print(f"chipo: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_intermixed_args(normalized)
    if args.config is None and name != "cost":
        args.config = str(packaged_config(name))
    runner = {"sft": _sft, "sweep": _sweep, "generate": _generate, "judge": _judge, "report": _report,
              "cost": _cost}[name]
    from chipo.judges import JudgeError

    try:
        return run_guarded(runner, args, ["tldr", *argv])
    except JudgeError as e:
        print(f"chipo: error: {e}", file=sys.stderr)
        return 2


def _sft(args, argv: list[str]) -> None:
    from chipo.recipes.tldr.layout import record_command
    from chipo.train.sft import run_sft
    from chipo.train.sft_config import SFTConfig

    config = load_config(SFTConfig, args.config, args.overrides)
    out = Path(config.output_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        print(f"chipo: SFT model already trained at {out}: skipped")
    else:
        if out.is_dir() and any(out.iterdir()) and not config.resume_from_checkpoint:
            config.resume_from_checkpoint = "latest"  # an interrupted SFT run: continue it (fresh if no checkpoint)
        run_sft(config)
        print(f"chipo: SFT model saved to {out}")
    record_command(out, argv)


def _sweep(args, argv: list[str]) -> None:
    from chipo.recipes.tldr.config import SweepStageConfig
    from chipo.recipes.tldr.layout import record_command
    from chipo.recipes.tldr.sweep import run_sweep

    config = load_config(SweepStageConfig, args.config, args.overrides)
    counts = run_sweep(config)
    print(f"chipo: sweep in {config.out_dir}: {counts['trained']} run(s) trained, {counts['skipped']} already done "
          f"(of {counts['runs']})")
    record_command(config.out_dir, argv)


def _generate(args, argv: list[str]) -> None:
    from chipo.recipes.tldr.config import GenerateStageConfig
    from chipo.recipes.tldr.generate import run_generate
    from chipo.recipes.tldr.layout import record_command

    config = load_config(GenerateStageConfig, args.config, args.overrides)
    counts = run_generate(config)
    print(f"chipo: generate in {config.out_dir}: {counts['generated']} cell(s) sampled, {counts['skipped']} "
          f"already done (of {counts['cells']})")
    record_command(config.out_dir, argv)


def _judge(args, argv: list[str]) -> None:
    from chipo.recipes.tldr.config import load_judge_stage
    from chipo.recipes.tldr.judge import run_judge_stage
    from chipo.recipes.tldr.layout import record_command

    stage, judge_config = load_judge_stage(args.config, args.overrides)
    counts = run_judge_stage(stage, judge_config)
    print(f"chipo: judge {stage.tag!r} in {stage.out_dir}: {counts['judged']} cell(s) judged, {counts['skipped']} "
          f"already done (of {counts['cells']}); {counts['flagged']} flagged for missing verdicts")
    record_command(stage.out_dir, argv)


def _report(args, argv: list[str]) -> None:
    from chipo.recipes.tldr.config import ReportStageConfig
    from chipo.recipes.tldr.layout import record_command
    from chipo.recipes.tldr.report import write_report

    config = load_config(ReportStageConfig, args.config, args.overrides)
    path = write_report(config, argv)
    record_command(config.out_dir, argv)
    print(f"chipo: report written to {path}")


def _cost(args, argv: list[str]) -> None:
    from chipo.recipes.tldr.cost import CostAssumptions, render_markdown, resolve_params

    config = load_config(CostAssumptions, args.config, args.overrides)
    n_params, source = resolve_params(config, None)
    print(render_markdown(config, n_params, source))
