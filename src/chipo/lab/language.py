"""The embedded world's language: prompts, the grammar of well-formed responses, the writers' distribution and
the gold reward (the tables, generated once from ``WorldSpec.seed``), with exact enumeration of the response space.

See ``chipo.lab.world`` for the whole construction and how pi_ref is trained on it. ``WorldScorer`` is the gold
reward as a ``chipo.rewards`` scorer (registered as ``world`` when ``chipo.lab`` is imported).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from chipo.models import forward_with_cache

WORLD_VERSION = "1"
"""Bump when the world's construction changes, so cached worlds are rebuilt."""

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


@dataclass(frozen=True)
class WorldSpec:
    """Everything that determines a world; its hash names the cache directory."""

    seed: int = 0
    n_topics: int = 8
    n_styles: int = 8
    n_letters: int = 6
    response_length: int = 4
    branching: int = 3
    n_eval_prompts: int = 16
    sft_samples_per_prompt: int = 64
    sft_epochs: int = 6
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128

    def key(self) -> str:
        payload = json.dumps({"version": WORLD_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()


# ---------------------------------------------------------------------------------------------------- language


@dataclass(frozen=True)
class Language:
    """The tables of a world: grammar, writers' probabilities, gold-reward weights (numpy arrays)."""

    spec: WorldSpec
    first_allowed: np.ndarray  # [n_topics, n_letters] bool
    succ_allowed: np.ndarray  # [n_letters, n_letters] bool
    first_probs: np.ndarray  # [n_topics, n_letters]
    trans_probs: np.ndarray  # [n_styles, n_letters, n_letters]
    gold_u: np.ndarray  # [n_topics, L, n_letters]
    gold_v: np.ndarray  # [n_styles, n_letters, n_letters]
    eval_prompts: tuple[tuple[int, int], ...]  # held-out (topic, style) pairs

    @staticmethod
    def generate(spec: WorldSpec) -> Language:
        rng = np.random.Generator(np.random.PCG64(spec.seed))
        k, b = spec.n_letters, spec.branching
        first_allowed = np.zeros((spec.n_topics, k), bool)
        first_probs = np.zeros((spec.n_topics, k))
        for t in range(spec.n_topics):
            allowed = rng.choice(k, b, replace=False)
            first_allowed[t, allowed] = True
            first_probs[t, allowed] = rng.dirichlet(np.ones(b))
        succ_allowed = np.zeros((k, k), bool)
        for a in range(k):
            succ_allowed[a, rng.choice(k, b, replace=False)] = True
        trans_probs = np.zeros((spec.n_styles, k, k))
        for s in range(spec.n_styles):
            for a in range(k):
                allowed = np.flatnonzero(succ_allowed[a])
                trans_probs[s, a, allowed] = rng.dirichlet(np.ones(b))
        gold_u = rng.standard_normal((spec.n_topics, spec.response_length, k))
        gold_v = rng.standard_normal((spec.n_styles, k, k))
        # Held-out prompts: a random subset of (topic, style) pairs; every topic and style still occurs in training.
        pairs = [(t, s) for t in range(spec.n_topics) for s in range(spec.n_styles)]
        order = rng.permutation(len(pairs))
        eval_prompts = tuple(sorted(pairs[i] for i in order[:spec.n_eval_prompts]))
        return Language(spec, first_allowed, succ_allowed, first_probs, trans_probs, gold_u, gold_v, eval_prompts)

    def to_json(self) -> dict:
        return {"spec": dataclasses.asdict(self.spec),
                **{f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), np.ndarray)},
                "eval_prompts": [list(p) for p in self.eval_prompts]}

    @staticmethod
    def from_json(data: dict) -> Language:
        arrays = {name: np.asarray(data[name], dtype=bool if name.endswith("allowed") else float)
                  for name in ("first_allowed", "succ_allowed", "first_probs", "trans_probs", "gold_u", "gold_v")}
        return Language(WorldSpec(**data["spec"]), eval_prompts=tuple(tuple(p) for p in data["eval_prompts"]),
                        **arrays)

    # --- text
    @property
    def letters(self) -> list[str]:
        return [chr(ord("a") + i) for i in range(self.spec.n_letters)]

    def prompt_text(self, topic: int, style: int) -> str:
        return f"t{topic} s{style}"

    def all_prompts(self) -> list[tuple[int, int]]:
        return [(t, s) for t in range(self.spec.n_topics) for s in range(self.spec.n_styles)]

    def train_prompts(self) -> list[tuple[int, int]]:
        held = set(self.eval_prompts)
        return [p for p in self.all_prompts() if p not in held]

    def parse_prompt(self, text: str) -> tuple[int, int] | None:
        parts = text.split()
        if len(parts) != 2 or not parts[0].startswith("t") or not parts[1].startswith("s"):
            return None
        try:
            topic, style = int(parts[0][1:]), int(parts[1][1:])
        except ValueError:
            return None
        if 0 <= topic < self.spec.n_topics and 0 <= style < self.spec.n_styles:
            return topic, style
        return None

    def parse_response(self, text: str) -> list[int] | None:
        """Letter indices of a well-formed response, None for anything outside the language."""
        words = text.split()
        if len(words) != self.spec.response_length:
            return None
        index = {c: i for i, c in enumerate(self.letters)}
        letters = [index.get(w) for w in words]
        if any(i is None for i in letters):
            return None
        return letters  # transitions are checked by the reward

    # --- the writers (the SFT corpus) and the gold judge
    def sample_responses(self, topic: int, style: int, n: int, rng: np.random.Generator) -> list[str]:
        out = []
        for _ in range(n):
            letter = rng.choice(self.spec.n_letters, p=self.first_probs[topic])
            seq = [letter]
            for _ in range(self.spec.response_length - 1):
                letter = rng.choice(self.spec.n_letters, p=self.trans_probs[style, letter])
                seq.append(letter)
            out.append(" ".join(self.letters[i] for i in seq))
        return out

    def gold(self, topic: int, style: int, letters: list[int] | None) -> float:
        """r*(x, y) of the module docstring; ``letters`` None means outside the language (reward 0)."""
        if letters is None or not self.first_allowed[topic, letters[0]]:
            return 0.0
        if not all(self.succ_allowed[a, b] for a, b in itertools.pairwise(letters)):
            return 0.0
        length = self.spec.response_length
        score = sum(self.gold_u[topic, t, a] for t, a in enumerate(letters))
        score += sum(self.gold_v[style, a, b] for a, b in itertools.pairwise(letters))
        return float(1.0 / (1.0 + math.exp(-2.0 * score / math.sqrt(2 * length - 1))))

    def gold_text(self, prompt: str, response: str) -> float:
        parsed = self.parse_prompt(prompt)
        if parsed is None:
            raise ValueError(f"not a prompt of this world: {prompt!r}")
        return self.gold(*parsed, self.parse_response(response))

    def response_space(self) -> list[str]:
        """Every letter string of the response length (where almost all of pi_ref's mass lies)."""
        return [" ".join(p) for p in itertools.product(self.letters, repeat=self.spec.response_length)]

    @torch.no_grad()
    def exact_partition(self, model, tokenizer, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """log pi of every cell of a fixed partition of *all* token sequences, with gold rewards.

        The next-token distribution after every letter prefix u of length k = 0..L is computed once per prefix,
        walking the trie of prefixes level by level with a KV cache (``next_token_logps``). The cells, for every
        prefix u of length k: ``u + EOS`` (a finished response of k letters), ``u + any non-letter non-EOS token``
        (lumped), and for k = L ``u + letter`` (every sequence that goes on past L letters, lumped per
        (L+1)-letter prefix). They are disjoint and cover every sequence, so the cell probabilities sum to 1. Gold
        rewards are constant on each cell (only ``u + EOS`` with u well-formed is rewarded), so J(pi) and win
        rates computed on the cells are exact, and KL / chi-squared on them are lower bounds of the full-sequence
        values (data processing), tight except inside the lumped cells.

        Returns (logp [P, C] float64, rewards [P, C], well_formed [P, C] bool), cells in a fixed order: for
        k = 0..L the K^k prefixes in lexicographic order, EOS cells then lumped cells, then the K^(L+1) cells
        ``u + letter``.
        """
        k_letters, length = self.spec.n_letters, self.spec.response_length
        letter_ids = tokenizer.convert_tokens_to_ids(self.letters)
        eos = tokenizer.eos_token_id
        strings = np.array(list(itertools.product(range(k_letters), repeat=length)))  # [N, L] lexicographic
        logps, rewards, formed = [], [], []
        for prompt in prompts:
            levels = next_token_logps(model, tokenizer(prompt)["input_ids"], letter_ids, length)
            cells = []
            prefix = np.zeros(1)  # log pi(u | x) of the prefixes of the current level
            for lp in levels:  # lp [K^k, V]: next token after each prefix u of length k
                lp_letters, lp_eos = lp[:, letter_ids], lp[:, eos]
                covered = np.logaddexp(np.logaddexp.reduce(lp_letters, axis=-1), lp_eos)
                with np.errstate(divide="ignore"):
                    lp_other = np.log(np.clip(-np.expm1(covered), 0.0, None))
                cells += [prefix + lp_eos, prefix + lp_other]
                prefix = (prefix[:, None] + lp_letters).reshape(-1)  # child p * K + j of prefix p, letter j
            cells.append(prefix)  # after the loop: the K^(L+1) prefixes one letter past L
            topic, style = self.parse_prompt(prompt)
            well = self.well_formed_table(topic, strings)
            good = np.where(well, self.gold_table(topic, style, strings), 0.0)
            before = sum(2 * k_letters ** k for k in range(length))  # the cells of the shorter prefixes
            tail = k_letters ** length + k_letters ** (length + 1)  # lumped cells of |u| = L, then u + letter
            logps.append(np.concatenate(cells))
            rewards.append(np.concatenate([np.zeros(before), good, np.zeros(tail)]))
            formed.append(np.concatenate([np.zeros(before, bool), well, np.zeros(tail, bool)]))
        return np.stack(logps), np.stack(rewards), np.stack(formed)

    def well_formed_table(self, topic: int, strings: np.ndarray) -> np.ndarray:
        """``_well_formed`` of each row of ``strings`` [N, L] (letter indices), vectorised: [N] bool."""
        return self.first_allowed[topic, strings[:, 0]] & self.succ_allowed[strings[:, :-1], strings[:, 1:]].all(1)

    def gold_table(self, topic: int, style: int, strings: np.ndarray) -> np.ndarray:
        """The sigmoid score of ``gold`` for each row of ``strings`` [N, L], *ignoring* well-formedness (the
        caller masks with ``well_formed_table``): [N] float64, equal to ``gold`` on well-formed rows."""
        length = self.spec.response_length
        score = self.gold_u[topic, np.arange(length), strings].sum(1)
        score = score + self.gold_v[style, strings[:, :-1], strings[:, 1:]].sum(1)
        return 1.0 / (1.0 + np.exp(-2.0 * score / math.sqrt(2 * length - 1)))

    def _well_formed(self, topic: int, letters: list[int]) -> bool:
        return bool(self.first_allowed[topic, letters[0]]) and all(
            self.succ_allowed[a, b] for a, b in itertools.pairwise(letters))


@torch.no_grad()
def next_token_logps(model, prompt_ids: list[int], letter_ids: list[int], depth: int) -> list[np.ndarray]:
    """log pi(. | x + u) (float64 [K^k, V]) for every letter string u of length k = 0..``depth``, u in
    lexicographic order of its letter indices (``letter_ids`` gives the token of each letter).

    One forward of the prompt, then one per level of the trie of prefixes: the KV cache of the K^(k-1) prefixes
    is repeated K times (row p * K + j extends prefix p with letter j) and only the new token runs. That is
    P + K + ... + K^depth token positions instead of K^depth x (P + depth) for one forward over every full
    string, with the same arithmetic per position (tests/lab/test_gold.py compares the two).
    """
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    out, cache = forward_with_cache(model, input_ids=ids)
    levels = [torch.log_softmax(out.logits[:, -1].double(), -1).cpu().numpy()]
    letters = torch.tensor(letter_ids, device=device)
    for k in range(1, depth + 1):
        cache.batch_repeat_interleave(len(letter_ids))
        step = letters.repeat(len(letter_ids) ** (k - 1))[:, None]
        out, cache = forward_with_cache(model, cache, input_ids=step)
        levels.append(torch.log_softmax(out.logits[:, -1].double(), -1).cpu().numpy())
    return levels


# ---------------------------------------------------------------------------------------------------- tokenizer + SFT


def writers_entropy(language: Language) -> float:
    """Mean entropy (nats) of the writers' response distribution over prompts: the floor of pi_ref's SFT loss."""
    def h(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())
    total = 0.0
    for topic, style in language.all_prompts():
        # Entropy of a Markov chain path = H(first) + sum over steps of E[H(next | current)].
        dist = language.first_probs[topic]
        ent = h(dist)
        for _ in range(language.spec.response_length - 1):
            ent += sum(dist[a] * h(language.trans_probs[style, a]) for a in range(language.spec.n_letters))
            dist = dist @ language.trans_probs[style]
        total += ent
    return total / len(language.all_prompts())


@lru_cache(maxsize=4)
def default_language() -> Language:
    """The language of ``WorldSpec()`` (tables only; no model is trained)."""
    return Language.generate(WorldSpec())


class WorldScorer:
    """The world's gold reward as a ``chipo.rewards.Scorer``, with its enumerable response space (exact evaluation).

    ``chipo.rewards.load_scorer`` finds it as ``world`` (the default world) and ``world:DIR`` (a world directory
    holding ``language.json``) through the ``chipo.scorers`` entry point (``pyproject.toml``).
    """

    reward_range = (0.0, 1.0)

    def __init__(self, language: Language):
        self.language = language
        self.name = "world"

    def score(self, prompts, responses) -> np.ndarray:
        try:
            return np.array([self.language.gold_text(p, r) for p, r in zip(prompts, responses, strict=True)])
        except ValueError as e:  # a prompt from outside the world: the user's input, not a bug
            from chipo.config import ConfigError

            raise ConfigError(f"scorer 'world' scores only the embedded world's prompts ('t<topic> s<style>'): "
                              f"{e}") from None

    @property
    def exact_min_new_tokens(self) -> int:
        """New tokens a sampler needs so that no response of the language is cut: its letters and EOS. With fewer,
        a cut sample of L letters reads as well-formed text while the exact partition counts pi's real
        continuation (``chipo.lab.evaluate.exact_sampling_problem``)."""
        return self.language.spec.response_length + 1

    def exact_partition(self, model, tokenizer, prompts):
        """(log pi [P, C], rewards [P, C], well-formed [P, C]) on a partition of all sequences (module docstring)."""
        return self.language.exact_partition(model, tokenizer, list(prompts))


def world_scorer(directory: str | None = None) -> WorldScorer:
    """The scorer of the default world (``directory`` None) or of the world saved in ``directory``."""
    from chipo.config import ConfigError

    if directory is None:
        return WorldScorer(default_language())
    path = Path(directory).expanduser() / "language.json"
    if not path.is_file():
        raise ConfigError(f"gold scorer 'world:{directory}': {path} not found (expected a world directory)")
    return WorldScorer(Language.from_json(json.loads(path.read_text())))


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The default world's gold reward as a plain callable: ``--gold chipo.lab.world:gold_reward``."""
    language = default_language()
    return [language.gold_text(p, r) for p, r in zip(prompts, responses, strict=True)]

