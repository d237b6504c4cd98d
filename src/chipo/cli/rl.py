"""``chipo rl --config rl.yaml key=value ...``"""

from __future__ import annotations

from chipo.cli.main import build_parser, run_guarded
from chipo.config import config_help, load_config
from chipo.train.rl_config import RLConfig

EXAMPLE = """example:
  chipo rl policy=runs/sft reward=runs/rm prompts=data/prompts.jsonl regularizer=chi2mix beta=0.05 k=4 \\
      max_steps=200 output_dir=runs/rl-chi2mix
  chipo rl policy=runs/sft reward=my_pkg.rewards:length_penalty prompts=data/prompts.jsonl regularizer=kl \\
      estimator=k3 beta=0.02
  # on the lab's embedded world, with the gold reward evaluated every 10 steps:
  chipo rl policy=<world>/pi_ref prompts=<world>/prompts_train.jsonl reward=runs/rm-world gold=world \\
      eval_every=10 eval_prompts=<world>/prompts_eval.jsonl

Per step, metrics.jsonl and stdout get: reward (proxy), penalized_reward, penalty, kl_k1, kl_k3, chi2 (Monte-Carlo,
high variance), response_length, loss; and eval_* (eval_gold with `gold`) every eval_every steps.

config keys (YAML file and/or key=value; values parsed as YAML scalars):
"""


def main(argv: list[str]) -> int:
    parser = build_parser("chipo rl", "Online RL (RLOO) against a reward, regularised by KL, chi2 or chi2 + KL.",
                          EXAMPLE + config_help(RLConfig))
    parser.add_argument("--config", help="YAML file of config keys (overridden by key=value arguments)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)

    def _train() -> None:
        from chipo.train.rl import run_rl

        config = load_config(RLConfig, args.config, args.overrides)
        out = run_rl(config)
        print(f"chipo: policy saved to {out}")

    return run_guarded(_train)
