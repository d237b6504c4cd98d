"""``RewardModelJudge``: a pairwise judge from any scorer ``score(prompts, responses) -> array``.

The scorer is a ``chipo.rewards.Scorer``, so everything the RL trainer and the lab score with works here: an HF
sequence-classification reward model (a local directory or a hub name), a registered scorer such as the lab's
``world``, or a ``module:function`` callable. a wins when its score exceeds b's by more than ``tie_tolerance``; a
non-finite score (a reward model that produced NaN) gives no verdict and counts as malformed.

A spec string is resolved by ``chipo.rewards.load_scorer``: a reward model tokenizes prompt and response exactly as
``chipo reward`` trained it, or, when a ``template`` is given, scores ``template.format(prompt=..., response=...)``
(for hub reward models that expect their own text format).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from chipo.judges.base import IDENTICAL, MALFORMED, OK, JudgeResult, check_lengths


class RewardModelJudge:
    """Compare ``score(prompt, a)`` with ``score(prompt, b)``.

    Args:
        scorer: an object with ``score(prompts, responses)`` (and optionally ``name``), or a spec string resolved
            by ``chipo.rewards.load_scorer``: a reward-model directory or hub name, a registered name or
            ``module:function``.
        tie_tolerance: |score_a - score_b| <= this is a tie (0.5). Default 0: only exactly equal scores tie.
        template: for a spec string naming a reward model: None (default) scores prompt and response tokenized
            as ``chipo reward`` trains; a string such as ``"{prompt}\n{response}"`` scores that formatted text.
        batch_size: for a spec string, the reward model's scoring batch size.
    """

    def __init__(self, scorer, *, tie_tolerance: float = 0.0, template: str | None = None, batch_size: int = 64):
        if tie_tolerance < 0:
            raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
        if isinstance(scorer, str):
            from chipo.rewards import load_scorer

            scorer = load_scorer(scorer, batch_size=batch_size, template=template)
        if not callable(getattr(scorer, "score", None)):
            raise TypeError(f"scorer must have a score(prompts, responses) method, got {type(scorer).__name__}")
        self.scorer = scorer
        self.tie_tolerance = float(tie_tolerance)
        self.name = f"reward-model:{getattr(scorer, 'name', type(scorer).__name__)}"

    def judge(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> JudgeResult:
        check_lengths(prompts, a, b)
        prompts, a, b = list(prompts), list(a), list(b)
        # One scoring call per side (not per item): reward models batch far better than they loop.
        scores_a = [float(s) for s in self.scorer.score(prompts, a)] if prompts else []
        scores_b = [float(s) for s in self.scorer.score(prompts, b)] if prompts else []
        if len(scores_a) != len(prompts) or len(scores_b) != len(prompts):
            raise ValueError(f"scorer returned {len(scores_a)} and {len(scores_b)} scores for {len(prompts)} items")
        outcomes, status, raw = [], [], []
        for x, y, sa, sb in zip(a, b, scores_a, scores_b, strict=True):
            raw.append(f"{sa!r} {sb!r}")
            if x == y:
                outcomes.append(0.5)
                status.append(IDENTICAL)
            elif not (math.isfinite(sa) and math.isfinite(sb)):
                outcomes.append(None)
                status.append(MALFORMED)
            else:
                diff = sa - sb
                outcomes.append(0.5 if abs(diff) <= self.tie_tolerance else (1.0 if diff > 0 else 0.0))
                status.append(OK)
        return JudgeResult(outcomes, status, raw)
