"""``chipo sft --config sft.yaml key=value ...``"""

from __future__ import annotations

from chipo.cli.main import build_parser, run_guarded
from chipo.config import config_help, load_config
from chipo.train.sft_config import SFTConfig

EXAMPLE = """example:
  chipo sft model=EleutherAI/pythia-1b dataset=trl-lib/tldr max_length=640 learning_rate=2e-5 \\
      bf16=true output_dir=runs/sft-pythia-1b
  accelerate launch --num_processes 8 -m chipo.cli.main sft --config sft.yaml

data: prompt + completion columns (strings or message lists), or messages (final assistant message = completion);
the loss is on completion tokens only (completion_only_loss=true).

config keys (YAML file and/or key=value; values parsed as YAML scalars):
"""


def main(argv: list[str]) -> int:
    parser = build_parser("chipo sft", "Supervised fine-tuning of a causal LM on prompt/completion data.",
                          EXAMPLE + config_help(SFTConfig))
    parser.add_argument("--config", help="YAML file of config keys (overridden by key=value arguments)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)

    def _sft() -> None:
        from chipo.train.sft import run_sft

        config = load_config(SFTConfig, args.config, args.overrides)
        out = run_sft(config)
        print(f"chipo: model saved to {out}")

    return run_guarded(_sft)
