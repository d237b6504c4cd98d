"""Sampling responses from a causal LM: the one sampler of chipo (RL, online training, the lab, recipes, inference).

``encode_prompts`` tokenizes prompts the way ``chipo.data`` does: a standard (string) prompt with the tokenizer's
special tokens; a conversational prompt (list of messages) rendered with the chat template and
``add_generation_prompt=True``, then tokenized without special tokens. Too-long prompts keep their last tokens.

``generate`` is batched HF ``generate`` with left padding and the KV cache, ancestral sampling (temperature 1,
no top-k / top-p by default) so that the samples come from pi itself, which the policy-gradient and divergence
estimators assume. A response's token ids are kept exactly as sampled (EOS included when it finished): anything
computed later from the samples (log-probs, preference pairs) uses these ids, never a re-tokenization of the text.
``VLLMGenerator`` is an optional faster backend for a *fixed* policy (best-of-n, pessimism) when vLLM is installed
and a GPU is present.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from chipo.data.tokenize import clean_messages


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled; recorded next to every number computed from samples."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 256

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Samples:
    """Responses for a list of prompts: row i answers prompt ``prompt_index[i]``."""

    prompt_index: list[int]
    response_ids: list[list[int]]  # sampled tokens, EOS included when the response finished
    texts: list[str]
    finished: list[bool]
    prompts: list[str] = field(default_factory=list)  # prompt texts, when known
    settings: dict = field(default_factory=dict)
    prompt_ids: list[list[int]] = field(default_factory=list)  # token ids of each prompt, when known

    def lengths(self) -> np.ndarray:
        """Response length in tokens, EOS excluded."""
        return np.array([len(ids) - int(done) for ids, done in zip(self.response_ids, self.finished)], dtype=float)

    def prompt_texts(self) -> list[str]:
        """The prompt text of every response (row i: ``prompts[prompt_index[i]]``)."""
        return [self.prompts[i] for i in self.prompt_index]


def prompt_text(tokenizer, prompt) -> tuple[str, bool]:
    """(text, is_rendered): a conversational prompt is rendered with the chat template (generation prompt added)."""
    if isinstance(prompt, str):
        return prompt, False
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational prompts need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(clean_messages(prompt), tokenize=False, add_generation_prompt=True), True


def encode_prompts(tokenizer, prompts: Sequence, max_prompt_length: int | None = None
                   ) -> tuple[list[list[int]], list[str]]:
    """Token ids and texts of prompts (strings or message lists), as ``chipo.data`` tokenizes them."""
    ids, texts = [], []
    for prompt in prompts:
        text, rendered = prompt_text(tokenizer, prompt)
        row = tokenizer(text, add_special_tokens=not rendered)["input_ids"]
        if max_prompt_length is not None:
            row = row[-max_prompt_length:]
        if not row:
            raise ValueError(f"prompt {text!r} has no tokens")
        ids.append(row)
        texts.append(text)
    return ids, texts


def decode_response(tokenizer, ids: list[int], finished: bool) -> str:
    """Text of a sampled response (its EOS removed); special tokens emitted mid-response are kept."""
    return tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=False).strip()


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [N, T] with every row ending at the last column (generation layout)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        input_ids[j, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        attention[j, width - len(r):] = 1
    return input_ids, attention


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: Sequence[list[int]], num_per_prompt: int, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 64,
             seed: int | None = None, progress: bool = False, desc: str = "sampling") -> Samples:
    """``num_per_prompt`` samples per prompt with HF ``generate`` (left-padded batches, KV cache, eval mode).

    With ``seed`` set, sampling is reproducible and the global torch RNG is restored afterwards; the model's
    train/eval mode is restored too.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    jobs = [i for i in range(len(prompt_ids)) for _ in range(num_per_prompt)]
    state = torch.random.get_rng_state() if seed is not None else None
    cuda_state = torch.cuda.get_rng_state_all() if seed is not None and torch.cuda.is_available() else None
    if seed is not None:
        torch.manual_seed(seed)
    response_ids, texts, finished = [], [], []
    try:
        starts = range(0, len(jobs), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not progress):
            input_ids, attention = left_pad([prompt_ids[i] for i in jobs[start:start + batch_size]], pad)
            width = input_ids.shape[1]
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                 use_cache=True)[:, width:].cpu()
            for row in out.tolist():
                done = eos in row
                row = row[:row.index(eos) + 1] if done else row
                response_ids.append(row)
                finished.append(done)
                texts.append(decode_response(tokenizer, row, done))
    finally:
        if state is not None:
            torch.random.set_rng_state(state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        model.train(was_training)
    return Samples(jobs, response_ids, texts, finished)


def sample_responses(model, tokenizer, prompts: Sequence[str], num_per_prompt: int, settings: SamplingSettings,
                     desc: str = "sampling", progress: bool = True) -> Samples:
    """``num_per_prompt`` responses per text prompt under ``settings`` (recorded in the result)."""
    prompt_ids, _ = encode_prompts(tokenizer, prompts)
    samples = generate(model, tokenizer, prompt_ids, num_per_prompt, max_new_tokens=settings.max_new_tokens,
                       temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                       batch_size=settings.batch_size, seed=settings.seed, progress=progress, desc=desc)
    samples.prompts, samples.settings, samples.prompt_ids = list(prompts), settings.as_dict(), prompt_ids
    return samples


class VLLMGenerator:
    """Optional vLLM backend for sampling from a fixed model directory (needs ``vllm`` and a CUDA GPU).

    Not used by the RL trainer, whose policy changes every step (its weights would have to be pushed into the
    engine each step); used by ``chipo.inference.samplers`` when ``backend="vllm"``.
    """

    def __init__(self, model_path: str, tokenizer, seed: int = 0, gpu_memory_utilization: float = 0.5):
        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError("backend 'vllm' needs the vllm package (pip install vllm)") from None
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'vllm' needs a CUDA GPU")
        self.tokenizer = tokenizer
        self.llm = LLM(model=model_path, seed=seed, gpu_memory_utilization=gpu_memory_utilization)

    def generate(self, prompt_ids: Sequence[list[int]], num_per_prompt: int, *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 **_: object) -> Samples:
        from vllm import SamplingParams

        params = SamplingParams(n=num_per_prompt, temperature=temperature, top_p=top_p, top_k=top_k or -1,
                                max_tokens=max_new_tokens, seed=seed)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        index, ids, texts, finished = [], [], [], []
        for i, out in enumerate(outputs):
            for completion in out.outputs:
                row = list(completion.token_ids)
                # vLLM may or may not keep the EOS it stopped on: normalise to "EOS included when finished".
                done = eos in row or completion.finish_reason == "stop"
                row = row[:row.index(eos) + 1] if eos in row else row + [eos] if done else row
                index.append(i)
                ids.append(row)
                finished.append(done)
                texts.append(decode_response(self.tokenizer, row, done))
        return Samples(index, ids, texts, finished)
