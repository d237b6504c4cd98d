"""The pairwise TL;DR comparison prompt and the parser of its answers.

The prompt asks which of two summaries better captures the post's key points concisely, and asks for a final line
``Preferred: A`` or ``Preferred: B``. A short comparison before the verdict is allowed (it tends to make the verdict
more reliable), so the parser looks for the verdict line anywhere in the reply.

``parse_verdict`` tolerates what chat models do to a fixed format (case, surrounding whitespace, markdown bold or
headings, quotes, "Summary A", trailing explanations, a bare "A" as the whole reply) but never guesses: a reply with
no verdict, an ambiguous verdict ("A or B") or two conflicting verdict lines gives None.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

FIRST, SECOND, TIE = "A", "B", "tie"


@dataclass(frozen=True)
class PairwisePrompt:
    """A pairwise comparison prompt. ``user`` is formatted with ``prompt``, ``first`` and ``second``.

    ``version`` names the template in the judge cache key: editing the text without changing the version still
    changes ``key`` (it hashes the text), so a cached answer to an old wording is never reused for a new one.
    """

    version: str
    system: str
    user: str

    def messages(self, prompt: str, first: str, second: str) -> list[dict]:
        user = self.user.format(prompt=prompt.strip(), first=first.strip(), second=second.strip())
        return ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": user}]

    @property
    def key(self) -> str:
        digest = hashlib.sha256(f"{self.system}\x00{self.user}".encode()).hexdigest()[:16]
        return f"{self.version}:{digest}"


TLDR_PROMPT = PairwisePrompt(
    version="tldr-pairwise-v1",
    system="You are a careful, impartial judge of summaries. You are not swayed by the order in which the "
           "summaries are shown or by their length alone.",
    user=(
        "Below is a forum post and two candidate summaries of it.\n\n"
        "A good summary states the post's key points (who, what happened, what the author asks or concludes) "
        "accurately and concisely. It does not add facts that are not in the post, and it leaves out minor "
        "details. Between two equally accurate summaries, prefer the shorter one; never prefer a summary that is "
        "wrong about the post.\n\n"
        "### Post\n{prompt}\n\n"
        "### Summary A\n{first}\n\n"
        "### Summary B\n{second}\n\n"
        "Which summary better captures the post's key points concisely? Compare them in at most two sentences. "
        "Then write the verdict as the final line, exactly in this format:\n"
        "Preferred: A\n"
        "or\n"
        "Preferred: B"
    ),
)

# A verdict line: "Preferred: ...", "Preferred summary - ...", "**Preferred**: ..." (markdown is stripped first).
_VERDICT_LINE = re.compile(r"^\s*(?:final\s+)?preferred(?:\s+summary)?\s*[:=\-\u2013\u2014]\s*(.*?)\s*$", re.I)
_MARKDOWN = re.compile(r"[*_`#>]+")
_LABEL_PREFIX = re.compile(r"^(?:summary|option|candidate|response)\s+", re.I)
_TRIM = " \t.,;:!?\"'()[]{}<>\u201c\u201d\u2018\u2019"


def _value_verdict(value: str) -> str | None:
    """A, B, tie or None for the text after "Preferred:"."""
    value = _LABEL_PREFIX.sub("", value.strip(_TRIM)).strip(_TRIM)
    if value.upper() in (FIRST, SECOND):
        return value.upper()
    if value.lower() in ("tie", "equal", "both equally good"):
        return TIE
    # "A (it is more concise)", "B. Summary B covers ...": an upper-case letter, then a non-word boundary, and the
    # other label must not appear as a word in the rest ("A or B", "A, although B ..." are ambiguous).
    # Lower case is accepted only alone (above): "a" is also the article ("Preferred: a summary that ...").
    match = re.match(r"^([AB])(?=[\s.,;:!)\-\u2013\u2014])(.*)$", value, re.S)
    if match:
        letter, rest = match.groups()
        other = SECOND if letter == FIRST else FIRST
        if not re.search(rf"\b{other}\b", rest):
            return letter
    return None


def parse_verdict(reply: str | None) -> str | None:
    """``"A"``, ``"B"``, ``"tie"`` or None (unparseable / ambiguous / conflicting), from a judge's reply."""
    if not reply or not reply.strip():
        return None
    lines = [_MARKDOWN.sub("", line) for line in reply.splitlines()]
    verdicts = set()
    for line in lines:
        match = _VERDICT_LINE.match(line)
        if match:
            verdict = _value_verdict(match.group(1))
            if verdict is not None:
                verdicts.add(verdict)
    if verdicts:
        return verdicts.pop() if len(verdicts) == 1 else None  # conflicting verdict lines: no verdict
    # No verdict line at all: accept a reply that is nothing but the label ("A", "**B**", "Summary B.").
    whole = " ".join(line.strip() for line in lines if line.strip())
    whole = _LABEL_PREFIX.sub("", whole.strip(_TRIM)).strip(_TRIM)
    return whole.upper() if whole.upper() in (FIRST, SECOND) else None
