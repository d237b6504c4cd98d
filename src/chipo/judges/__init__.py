"""Pairwise judges: which of two responses to a prompt is better, as used by the TL;DR recipe and the lab.

Every judge implements ``Judge.judge(prompts, a, b) -> JudgeResult`` (``chipo.judges.base``): per item 1.0 (a
wins), 0.0 (b wins), 0.5 (tie) or None (no verdict: unparseable answer or failed request, counted, never guessed).

- ``RewardModelJudge``: compares reward-model (or any scorer's) scores; ties when equal.
- ``OpenAIChatJudge``: an LLM behind any OpenAI-compatible chat-completions endpoint (local vLLM or hosted), with
  the TL;DR comparison prompt, seeded order randomisation, retries with backoff, a concurrency limit and a disk
  cache of replies.

``build_judge("openai" | "reward-model", config)`` makes one from its typed config (used by ``chipo judge``).
"""

from chipo.judges.base import STATUSES, Judge, JudgeError, JudgeResult
from chipo.judges.chat import OpenAIChatJudge
from chipo.judges.config import OpenAIJudgeConfig, RewardModelJudgeConfig
from chipo.judges.prompt import TLDR_PROMPT, PairwisePrompt, parse_verdict
from chipo.judges.reward_model import RewardModelJudge

JUDGE_CONFIGS = {"openai": OpenAIJudgeConfig, "reward-model": RewardModelJudgeConfig}


def build_judge(kind: str, config, *, prompt: PairwisePrompt | None = None) -> Judge:
    """A judge of ``kind`` (a key of ``JUDGE_CONFIGS``) from its config object; ``prompt``: the LLM judge's
    comparison prompt (default: the TL;DR one)."""
    if kind == "openai":
        return OpenAIChatJudge(config) if prompt is None else OpenAIChatJudge(config, prompt=prompt)
    if kind == "reward-model":
        return RewardModelJudge(config.model, tie_tolerance=config.tie_tolerance, template=config.template,
                                batch_size=config.batch_size)
    raise ValueError(f"unknown judge {kind!r}; choose from {', '.join(JUDGE_CONFIGS)}")


__all__ = [
    "JUDGE_CONFIGS",
    "STATUSES",
    "TLDR_PROMPT",
    "Judge",
    "JudgeError",
    "JudgeResult",
    "OpenAIChatJudge",
    "OpenAIJudgeConfig",
    "PairwisePrompt",
    "RewardModelJudge",
    "RewardModelJudgeConfig",
    "build_judge",
    "parse_verdict",
]
