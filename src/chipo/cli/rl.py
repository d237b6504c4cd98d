"""``chipo rl --config rl.yaml key=value ...``"""

from __future__ import annotations

from chipo.cli.main import config_command
from chipo.train.rl_config import RLConfig
from chipo.train.sampled_config import SampledConfig

EXAMPLE = """example:
  chipo rl policy=runs/sft reward=runs/rm prompts=data/prompts.jsonl regularizer=chi2mix beta=0.05 k=4 \\
      max_steps=200 output_dir=runs/rl-chi2mix
  chipo rl policy=runs/sft reward=my_pkg.rewards:length_penalty prompts=data/prompts.jsonl regularizer=kl \\
      estimator=k3 beta=0.02
  # on the lab's embedded world, with the gold reward evaluated every 10 steps:
  chipo rl policy=<world>/pi_ref prompts=<world>/prompts_train.jsonl reward=runs/rm-world gold=world \\
      eval_steps=10 eval_prompts=<world>/prompts_eval.jsonl
  # 8 processes (DDP, or DeepSpeed ZeRO-1/2 per the accelerate config), each sampling 64/8 prompts per step:
  accelerate launch --num_processes 8 -m chipo.cli.main rl --config rl.yaml prompts_per_step=64
  # continue after an interruption (the same command, from the newest complete checkpoint-<step>):
  chipo rl --config rl.yaml resume_from_checkpoint=latest

Per step, metrics.jsonl and stdout get (reduced over processes): reward (proxy), penalized_reward, penalty, kl_k1,
kl_k3, chi2 (Monte-Carlo, high variance), log_ratio_max, grad_norm, response_length, finished, learning_rate, loss;
and eval_* (eval_gold with `gold`) every eval_steps steps. report_to=tensorboard,wandb,... logs them there too.
"""

GROUPS = {"online RL (chipo)": RLConfig, "policy, prompts, sampling, optimisation, checkpoints (chipo)": SampledConfig}


def run(config: RLConfig):
    """``chipo.train.rl_run.run_rl``, imported here, not at the top, so that ``chipo rl --help`` stays fast."""
    from chipo.train.rl_run import run_rl

    return run_rl(config)


def main(argv: list[str]) -> int:
    return config_command(argv, prog="chipo rl", example=EXAMPLE, config_cls=RLConfig,
                          description="Online RL (RLOO) against a reward, regularised by KL, chi2 or chi2 + KL.",
                          runner="chipo.cli.rl:run", saved="policy", groups=GROUPS)
