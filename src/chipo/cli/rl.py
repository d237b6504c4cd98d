"""``chipo rl --config rl.yaml key=value ...``"""

from __future__ import annotations

from chipo.cli.main import config_command
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
"""


def main(argv: list[str]) -> int:
    return config_command(argv, prog="chipo rl", example=EXAMPLE, config_cls=RLConfig,
                          description="Online RL (RLOO) against a reward, regularised by KL, chi2 or chi2 + KL.",
                          runner="chipo.train.rl:run_rl", saved="policy")
