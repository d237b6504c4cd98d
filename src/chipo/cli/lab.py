"""``chipo demo`` and ``chipo lab {generate-prefs, evaluate, sweep, report}``: config commands (key=value)."""

from __future__ import annotations

import sys

from chipo.cli.main import config_command
from chipo.lab.configs import DemoConfig, EvaluateConfig, GeneratePrefsConfig, ReportConfig
from chipo.lab.methods import MethodTableConfig
from chipo.lab.sweep import SweepConfig

SUBCOMMANDS = {
    "generate-prefs": (GeneratePrefsConfig, "chipo.lab.commands:generate_prefs",
                       "Preference data by the process of Huang et al. 2024 (arXiv 2407.13399): two pi_ref samples "
                       "per pair, Bradley-Terry labels from the gold reward.",
                       "  chipo lab generate-prefs policy=runs/sft prompts=prompts.jsonl gold=runs/gold-rm scale=1 "
                       "out=prefs.jsonl\n"),
    "evaluate": (EvaluateConfig, "chipo.lab.commands:evaluate",
                 "Evaluate a policy against pi_ref under the gold reward.",
                 "  chipo lab evaluate policy=runs/chipo ref=runs/sft prompts=heldout.jsonl gold=runs/gold-rm "
                 "out=metrics.json\n"),
    "sweep": (SweepConfig, "chipo.lab.commands:sweep",
              "Losses x betas x seeds, each run evaluated at several epochs; resumable.",
              "  chipo lab sweep ref_model=runs/sft train_prefs=prefs.jsonl eval_prompts=heldout.jsonl "
              "gold=runs/gold-rm losses=dpo,chipo betas=0.05,0.005 seeds=0,1,2 epochs=8 out_dir=sweep/ report=true\n"
              "  ... variants=dpo:dpo,rpo:dpo:sft_weight=1,chipo:chipo   # methods as loss + options\n"),
    "report": (ReportConfig, "chipo.lab.commands:report",
               "report.md, plots, results.json/csv from a sweep directory.",
               "  chipo lab report sweep_dir=sweep/ out=report/\n"),
    "methods": (MethodTableConfig, "chipo.lab.methods:run_methods_command",
                "Every method on the embedded world at one label budget, tested against DPO: the method table.",
                "  chipo lab methods out=chipo-methods seeds=8          # all methods, beta 0.05 and 0.005\n"
                "  chipo lab methods --quick seeds=2 out=/tmp/methods   # smoke test\n"),
}


def demo(argv: list[str]) -> int:
    """``chipo demo [--quick] [--full] [key=value ...]``."""
    return config_command(argv, prog="chipo demo", config_cls=DemoConfig, runner="chipo.lab.commands:run_demo_command",
                          description=DemoConfig.__doc__.split("\n")[0], saved="report",
                          example="example:\n  chipo demo            # 8 seeds, 16 epochs: 2 min 22 s on 2 idle cores "
                                  "(268 CPU-seconds in all processes, 2 workers)\n"
                                  "  chipo demo --quick    # 1 seed, 4 epochs: 19 s on 2 idle cores (29 CPU-seconds)\n"
                                  "  chipo demo --full     # plus RLHF, best-of-n, pessimism and online\n"
                                  "  chipo demo experiments=offline,online   # the experiments named (chipo.lab."
                                  "experiments)\n"
                                  "  chipo demo --ablations  # plus each loss with RPO's SFT term / a reward bound\n")


def main(argv: list[str]) -> int:
    """``chipo lab <subcommand> [--config FILE] [key=value ...]``."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: chipo lab {" + ",".join(SUBCOMMANDS) + "} [--config FILE] [key=value ...]\n")
        for name, (_, _, description, _) in SUBCOMMANDS.items():
            print(f"  {name:<15} {description}")
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"chipo: error: unknown lab command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    config_cls, runner, description, example = SUBCOMMANDS[argv[0]]
    rest = argv[1:]
    if argv[0] == "report" and rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest = [f"sweep_dir={rest[0]}", *rest[1:]]  # chipo lab report DIR
    return config_command(rest, prog=f"chipo lab {argv[0]}", config_cls=config_cls, runner=runner,
                          description=description, example="example:\n" + example)
