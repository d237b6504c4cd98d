"""Tiny models and tokenizers built locally, in code: for tests, the demo and benchmarks (no hub access).

``build_tokenizer`` trains a byte-level BPE on a given corpus with the ``tokenizers`` library and wraps it in
a ``PreTrainedTokenizerFast`` with pad/bos/eos tokens and a chat template, so both TRL dataset formats
(standard strings and conversational messages) work with it. ``build_tiny_llama`` makes a randomly initialised
``LlamaForCausalLM`` from a config. Both save/load with the usual ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A minimal chat template: rendering prompt + assistant turn extends the prompt rendered with
``add_generation_prompt=True`` only when the assistant header is shared; chipo's data pipeline relies on
the tokenizer's template, whatever it is, and checks that prefix property per row."""

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def default_corpus() -> list[str]:
    """A small English-like corpus so a tokenizer can be trained with no data at hand."""
    words = ("the a cat dog sat on mat good bad summary post this is short long answer question why how "
             "model policy reward preference chosen rejected prompt response helpful harmless").split()
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        idx = torch.randint(len(words), (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
        lines.append(" ".join(words[i] for i in idx.tolist()) + ".")
    return lines


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` (default: ``default_corpus()``) with chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus) if corpus is not None else default_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>",
        additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )


def build_tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    pad_token_id: int | None = 0,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given size (deterministic in ``seed``), fp32."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_model_and_tokenizer(seed: int = 0, vocab_size: int = 512, **model_kwargs) -> tuple:
    """(model, tokenizer) pair with matching special-token ids."""
    tokenizer = build_tokenizer(vocab_size=vocab_size)
    model = build_tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, seed=seed, **model_kwargs)
    return model, tokenizer


def toy_preference_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """Standard-format preference rows whose chosen responses are systematically "good" and rejected "bad",
    with widely varying lengths, so a trainer's reward accuracy and margins should rise as it learns."""
    g = torch.Generator().manual_seed(seed)
    topics = "cat dog model policy reward summary post answer question mat".split()
    rows = []
    for i in range(n):
        topic = topics[int(torch.randint(len(topics), (1,), generator=g))]
        k = int(torch.randint(1, 8, (1,), generator=g))
        rows.append({
            "prompt": f"why is the {topic} {'short' if i % 2 else 'long'}? ",
            "chosen": " ".join(["good helpful answer"] * k) + ".",
            "rejected": " ".join(["bad"] * int(torch.randint(1, 10, (1,), generator=g))) + " harmless.",
        })
    return rows



def save_tiny_model(directory, seed: int = 0, **model_kwargs) -> None:
    """Build a tiny Llama + tokenizer and save both as an HF directory (loadable by from_pretrained)."""
    model, tokenizer = tiny_model_and_tokenizer(seed=seed, **model_kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
