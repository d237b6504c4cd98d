"""``chipo online --config online.yaml key=value ...``"""

from __future__ import annotations

import sys

from chipo.cli.main import config_command
from chipo.train.config import PreferenceLossFields
from chipo.train.online_config import OnlineConfig
from chipo.train.sampled_config import SampledConfig

EXAMPLE = """examples:
  # online chiPO against a reward model, Bradley-Terry labels, at most 2000 judge calls
  chipo online policy=runs/sft prompts=data/prompts.jsonl judge=runs/rm loss=chipo beta=0.05 max_labels=2000
  # chi-squared XPO (Xie et al. 2024, arXiv 2405.21046): one response from pi, one from pi_ref, exploration bonus
  chipo online policy=runs/sft prompts=data/prompts.jsonl judge=runs/rm loss=chipo exploration=xpo xpo_alpha=1e-4
  # Nash-MD (Munos et al. 2023, arXiv 2312.00886) with an LLM judge behind an OpenAI-compatible server
  chipo online policy=runs/sft prompts=data/prompts.jsonl loss=nash-md mixture_coef=0.5 beta=0.05 \\
      judge=openai judge_base_url=http://localhost:8000/v1 judge_model=Qwen/Qwen2.5-7B-Instruct
  # several processes (DDP): the same command under accelerate
  accelerate launch --num_processes 4 -m chipo.cli.main online --config online.yaml

Per step, metrics.jsonl and stdout get TRL's names (loss, rewards/chosen|rejected|margins|accuracies, logps/...;
nash-md: loss/score, loss/kl, rewards/probabilities; xpo: loss/xpo), the distance to pi_ref from the policy's
samples (kl: the k3 estimate, kl_k1, chi2), labels (judge calls so far), labels/step, labels/missing (no verdict),
labels/ties, response_length and grad_norm.
"""

GROUPS = {"online preference optimization (chipo)": OnlineConfig, "objective (chipo)": PreferenceLossFields,
          "policy, prompts, sampling, optimisation, checkpoints (chipo)": SampledConfig}


def run(config: OnlineConfig):
    """``chipo.train.online.run_online``, imported here, not at the top, so that ``chipo online --help`` stays fast."""
    from chipo.train.online import run_online

    return run_online(config)


def main(argv: list[str]) -> int:
    from chipo.judges import JudgeError

    try:
        return config_command(argv, prog="chipo online", example=EXAMPLE, config_cls=OnlineConfig,
                              description="Online preference optimization (online DPO / chiPO, XPO, Nash-MD) "
                                          "against a reward model, a scorer or an LLM judge.",
                              runner="chipo.cli.online:run", saved="policy", groups=GROUPS)
    except JudgeError as e:
        print(f"chipo: error: {e}", file=sys.stderr)
        return 2
