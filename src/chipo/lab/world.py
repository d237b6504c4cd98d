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
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chipo.lab.language import (  # noqa: F401 -- the world's language, re-exported with it
    BOS,
    EOS,
    PAD,
    WORLD_VERSION,
    Language,
    WorldScorer,
    WorldSpec,
    default_language,
    gold_reward,
    world_scorer,
    writers_entropy,
)

logger = logging.getLogger("chipo.lab")

def cache_root() -> Path:
    return Path(os.environ.get("CHIPO_CACHE", "~/.cache/chipo")).expanduser()


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
