"""The embedded world: a tiny synthetic language, its pi_ref (a small HF Llama trained by SFT) and a gold reward.

It is a fair miniature of the RLHF setting of Huang et al. 2024 (arXiv 2407.13399, section 2), small enough that the
whole response space of a prompt can be enumerated, so the lab can report exact J(pi), KL and chi-squared
besides the Monte-Carlo estimates it must use with real models.

The language (fixed by ``WorldSpec.seed``, generated once with numpy's PCG64 and stored with the world):

* A prompt is ``"t<i> s<j>"``: a topic ``i`` and a style ``j`` (``n_topics x n_styles`` prompts).
* A response is ``response_length`` letters out of ``n_letters`` (``"b d a c"``). It is *well-formed* when its
  first letter is one of ``branching`` letters allowed for the topic and each next letter is one of
  ``branching`` successors allowed after the previous letter (a fixed grammar shared by all prompts), and it has
  exactly ``response_length`` letters. Any other text -- other lengths, other tokens, forbidden transitions -- is
  outside the language.
* The "writers" of the language (the SFT corpus) sample well-formed responses from a prompt-dependent Markov
  chain: first letter ~ Dirichlet(1) weights of the topic, transitions ~ Dirichlet(1) weights of the style.
* pi_ref is a 2-layer Llama trained by ``transformers.Trainer`` (cross-entropy on response tokens) on that
  corpus. Like any LM it gives every token sequence positive probability, so a policy initialised from it *can*
  leave the language: the policy class is not restricted to pi_ref's support.

The gold reward r*(x, y) in [0, 1], defined once, independently of any algorithm (it is the world's "judge"):

    r*(x, y) = sigmoid( 2 * ( sum_t U[topic, t, y_t] + sum_t V[style, y_t, y_{t+1}] ) / sqrt(2L - 1) )
               if y is well-formed,       0 otherwise,

with U, V fixed standard-normal tables: a random non-linear score of content for text in the language, and the
lowest score for text outside it -- as a human or model judge scores gibberish. It is unrelated to pi_ref's
probabilities (the writers do not know the judge), so pi_ref is a mediocre but safe policy (random non-linear
score, zero off the chain's support).

Exact evaluation: the responses pi_ref produces are the ``n_letters ** response_length`` letter strings followed
by EOS; the lab scores all of them exactly and lumps every other sequence (whose gold reward is 0 by definition)
into one outcome, so J(pi) and the win rates are exact, and KL / chi-squared are exact over that partition (a
lower bound of the divergence over full sequences, by the data-processing inequality; tight when the lumped mass
is small).

The world (tables, tokenizer, pi_ref, prompt splits) is built on first use and cached under
``~/.cache/chipo/world/<hash of the spec>`` (``CHIPO_CACHE`` overrides ``~/.cache/chipo``), written to a temporary
directory and renamed into place, so an interrupted build never leaves a half world behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("chipo.lab")

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


def cache_root() -> Path:
    return Path(os.environ.get("CHIPO_CACHE", "~/.cache/chipo")).expanduser()


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

        One forward pass over the K^L letter strings of length L gives the next-token distribution after every
        letter prefix of length k = 0..L. The cells, for every prefix u of length k:
        ``u + EOS`` (a finished response of k letters), ``u + any non-letter non-EOS token`` (lumped), and for
        k = L ``u + letter`` (every sequence that goes on past L letters, lumped per 5-letter prefix). They are
        disjoint and cover every sequence, so the cell probabilities sum to 1. Gold rewards are constant on
        each cell (only ``u + EOS`` with u well-formed is rewarded), so J(pi) and win rates computed on the
        cells are exact, and KL / chi-squared on them are lower bounds of the full-sequence values (data
        processing), tight except inside the lumped cells.

        Returns (logp [P, C] float64, rewards [P, C], well_formed [P, C] bool), cells in a fixed order.
        """
        k_letters, length = self.spec.n_letters, self.spec.response_length
        letter_ids = tokenizer.convert_tokens_to_ids(self.letters)
        eos = tokenizer.eos_token_id
        strings = np.array(list(itertools.product(range(k_letters), repeat=length)))  # [N, L] lexicographic
        token_strings = torch.tensor(np.asarray(letter_ids)[strings])
        reps = [np.arange(0, len(strings), k_letters ** (length - k)) for k in range(length + 1)]  # one row/prefix
        device = next(model.parameters()).device
        logps, rewards, formed = [], [], []
        for prompt in prompts:
            prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"])
            ids = torch.cat([prompt_ids.expand(len(strings), -1), token_strings], dim=1).to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, len(prompt_ids) - 1:].double().cpu()
            lp = torch.log_softmax(logits, dim=-1).numpy()  # [N, L + 1, V]: next token after prefix k
            lp_letters, lp_eos = lp[:, :, letter_ids], lp[:, :, eos]
            covered = np.logaddexp(np.logaddexp.reduce(lp_letters, axis=-1), lp_eos)
            with np.errstate(divide="ignore"):
                lp_other = np.log(np.clip(-np.expm1(covered), 0.0, None))
            taken = np.take_along_axis(lp_letters[:, :length], strings[:, :, None], axis=-1)[..., 0]
            prefix = np.concatenate([np.zeros((len(strings), 1)), np.cumsum(taken, axis=1)], axis=1)  # [N, L + 1]
            cells, cell_rewards, cell_formed = [], [], []
            topic, style = self.parse_prompt(prompt)
            for k in range(length + 1):
                rows = reps[k]
                cells += [prefix[rows, k] + lp_eos[rows, k], prefix[rows, k] + lp_other[rows, k]]
                if k == length:
                    good = np.array([self.gold(topic, style, list(s)) for s in strings])
                    well = np.array([self._well_formed(topic, list(s)) for s in strings])
                else:
                    good, well = np.zeros(len(rows)), np.zeros(len(rows), bool)
                cell_rewards += [good, np.zeros(len(rows))]
                cell_formed += [well, np.zeros(len(rows), bool)]
            cells.append((prefix[:, length, None] + lp_letters[:, length]).reshape(-1))
            cell_rewards.append(np.zeros(len(strings) * k_letters))
            cell_formed.append(np.zeros(len(strings) * k_letters, bool))
            logps.append(np.concatenate(cells))
            rewards.append(np.concatenate(cell_rewards))
            formed.append(np.concatenate(cell_formed))
        return np.stack(logps), np.stack(rewards), np.stack(formed)

    def _well_formed(self, topic: int, letters: list[int]) -> bool:
        return bool(self.first_allowed[topic, letters[0]]) and all(
            self.succ_allowed[a, b] for a, b in itertools.pairwise(letters))


# ---------------------------------------------------------------------------------------------------- tokenizer + SFT


def build_tokenizer(language: Language):
    """A word-level tokenizer: one token per topic, style and letter, with BOS prepended to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    spec = language.spec
    words = [PAD, BOS, EOS] + [f"t{i}" for i in range(spec.n_topics)] + [f"s{i}" for i in range(spec.n_styles)]
    words += language.letters + ["<|unk|>"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token="<|unk|>", model_max_length=64)


def _sft_dataset(language: Language, tokenizer, rng: np.random.Generator):
    from datasets import Dataset

    rows = []
    for topic, style in language.all_prompts():
        prompt = tokenizer(language.prompt_text(topic, style))["input_ids"]
        for response in language.sample_responses(topic, style, language.spec.sft_samples_per_prompt, rng):
            ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            # Loss on response tokens only (prompt positions are -100), as in SFT on prompt/completion data.
            rows.append({"input_ids": prompt + ids, "labels": [-100] * len(prompt) + ids})
    return Dataset.from_list(rows)


def train_reference(language: Language, tokenizer, out_dir: Path, quiet: bool = True):
    """SFT of pi_ref on the writers' corpus with ``transformers.Trainer``; saves an HF model in ``out_dir``."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    from chipo.toy import build_tiny_llama

    spec = language.spec
    rng = np.random.Generator(np.random.PCG64(spec.seed + 1))
    dataset = _sft_dataset(language, tokenizer, rng)
    model = build_tiny_llama(len(tokenizer), hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                             num_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
                             max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, seed=spec.seed)
    args = TrainingArguments(
        output_dir=str(out_dir / "sft-tmp"), num_train_epochs=spec.sft_epochs, per_device_train_batch_size=
        spec.sft_batch_size, learning_rate=spec.sft_lr, lr_scheduler_type="cosine", warmup_steps=0.05,
        weight_decay=0.0, logging_steps=10**6, save_strategy="no", report_to="none", seed=spec.seed,
        disable_tqdm=quiet, dataloader_num_workers=0, dataloader_pin_memory=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    # With tqdm off, transformers prints every log dict to stdout (PrinterCallback): silence it when quiet.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if quiet else sys.stdout):
        result = trainer.train()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "sft-tmp", ignore_errors=True)
    return float(result.training_loss)


# ---------------------------------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class World:
    """A built world on disk: ``root/`` holds ``language.json``, ``pi_ref/`` (HF model + tokenizer), prompt files."""

    root: Path
    language: Language

    @property
    def pi_ref(self) -> str:
        return str(self.root / "pi_ref")

    @property
    def train_prompts_path(self) -> str:
        return str(self.root / "prompts_train.jsonl")

    @property
    def eval_prompts_path(self) -> str:
        return str(self.root / "prompts_eval.jsonl")

    def info(self) -> dict:
        return json.loads((self.root / "world.json").read_text())

    def scorer(self) -> WorldScorer:
        return WorldScorer(self.language)

    @property
    def gold_spec(self) -> str:
        """The ``--gold`` spec of this world's judge."""
        return f"world:{self.root}"


def load_or_build_world(spec: WorldSpec | None = None, cache_dir: str | os.PathLike | None = None,
                        quiet: bool = True) -> World:
    """The cached world for ``spec`` (default ``WorldSpec()``), building it on first use (about half a minute)."""
    spec = spec or WorldSpec()
    base = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "world"
    root = base / spec.key()
    if (root / "world.json").is_file():
        return World(root, Language.from_json(json.loads((root / "language.json").read_text())))
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{spec.key()}-"))
    try:
        start = time.perf_counter()
        language = Language.generate(spec)
        (tmp / "language.json").write_text(json.dumps(language.to_json()))
        tokenizer = build_tokenizer(language)
        sft_loss = train_reference(language, tokenizer, tmp / "pi_ref", quiet=quiet)
        rng = np.random.Generator(np.random.PCG64(spec.seed + 2))
        _write_prompts(tmp / "prompts_train.jsonl", language, language.train_prompts(), None)
        _write_prompts(tmp / "prompts_eval.jsonl", language, list(language.eval_prompts), rng)
        info = {"spec": dataclasses.asdict(spec), "key": spec.key(), "version": WORLD_VERSION,
                "sft_loss": sft_loss, "build_seconds": time.perf_counter() - start,
                "writers_entropy_nats": writers_entropy(language)}
        (tmp / "world.json").write_text(json.dumps(info, indent=2))
        try:
            os.replace(tmp, root)
        except OSError:  # another process built it first: use theirs
            if not (root / "world.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return World(root, Language.from_json(json.loads((root / "language.json").read_text())))


def _write_prompts(path: Path, language: Language, prompts: list[tuple[int, int]], rng) -> None:
    """Prompt files; held-out prompts carry a ``reference`` response written by the language's writers."""
    with path.open("w") as f:
        for topic, style in prompts:
            row = {"prompt": language.prompt_text(topic, style)}
            if rng is not None:
                row["reference"] = language.sample_responses(topic, style, 1, rng)[0]
            f.write(json.dumps(row) + "\n")


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

    Registered in ``chipo.rewards`` as ``world`` (the default world) and ``world:DIR`` (a world directory holding
    ``language.json``) when ``chipo.lab`` is imported.
    """

    reward_range = (0.0, 1.0)

    def __init__(self, language: Language):
        self.language = language
        self.name = "world"

    def score(self, prompts, responses) -> np.ndarray:
        return np.array([self.language.gold_text(p, r) for p, r in zip(prompts, responses, strict=True)])

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

