"""The generate stage: one summary per test prompt from every kept checkpoint (and the SFT model), with KL.

The test subset is the first ``num_prompts`` rows of ``trl-lib/tldr``'s ``test`` split in dataset order (default
512 of its 6,553), fixed so that every cell, seed and rerun is judged on the same posts; its SHA-256 is recorded.
Sampling is plain ancestral sampling by default (temperature 1, no top-p / top-k): the samples then come from pi
itself, which the KL estimates below assume, and the judge sees what the policy actually writes. Every setting is
recorded with the samples. Batched: vLLM when installed and a GPU is present (``backend=auto``), HF ``generate``
otherwise (``chipo.generation``).

Distribution shift from pi_ref per cell, on the cell's own samples y ~ pi(.|x) with L = log pi(y|x) -
log pi_ref(y|x) over the sampled tokens (EOS included): ``kl_k1`` = mean L (unbiased, can be negative per sample)
and ``kl_k3`` = ``chipo.divergences.KL.estimate_from_policy`` (E_pi[1/z - 1 + log z], non-negative per sample),
each with its standard error over prompts, as ``chipo.lab.evaluate`` computes them; ``chi2_mc`` likewise (a noisy
lower bound when large: its variance grows with the distance itself).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path

import torch

from chipo.config import ConfigError
from chipo.io import read_json, write_json, write_jsonl
from chipo.models import load_causal_lm
from chipo.recipes.tldr.config import GenerateStageConfig
from chipo.recipes.tldr.layout import SFT, Cell, Layout, only_cell_files

logger = logging.getLogger("chipo.recipes.tldr")


def load_test_prompts(config: GenerateStageConfig) -> tuple[list[str], list[str], dict]:
    """(posts, reference summaries, description of the subset incl. its SHA-256) of the fixed test subset."""
    from chipo.data.prompts import load_prompts

    source = config.prompts_dataset
    rows = load_prompts(source, config.prompts_split, config.num_prompts, column=config.prompt_field,
                        text_only=True, reference_columns=(config.reference_field,), require_references=True)
    prompts, references = rows.prompts, rows.references
    digest = hashlib.sha256(json.dumps([prompts, references], ensure_ascii=False).encode()).hexdigest()
    subset = {"dataset": source, "split": config.prompts_split, "rows": f"first {len(prompts)}",
              "n": len(prompts), "sha256": digest}
    return prompts, references, subset


def sft_model_of(config: GenerateStageConfig, layout: Layout) -> str:
    sweep = read_json(layout.sweep_json) or {}
    model = config.sft_model or sweep.get("config", {}).get("sft_model")
    if not model:
        raise ConfigError(f"no sft_model: {layout.sweep_json} is missing (run the sweep stage first) and "
                          "sft_model= was not given")
    return model


def policy_cells(config: GenerateStageConfig, layout: Layout, sft_model: str) -> list[tuple[Cell, str, str]]:
    """(cell, model path, model id) of the SFT model and every kept checkpoint of every finished run; the id
    names a checkpoint relative to the recipe directory, so the directory can move."""
    cells = [(SFT, sft_model, SFT.run)] if config.include_sft else []
    for done in layout.finished_runs():
        if done["sft_model"] != sft_model:
            raise ConfigError(f"run {layout.run_dir(done['loss'], done['beta'], done['seed']).name} started from "
                              f"{done['sft_model']}, not {sft_model}: its KL to pi_ref would be to the wrong model")
        run_dir = layout.run_dir(done["loss"], done["beta"], done["seed"])
        kept = {int(e): rel for e, rel in done["checkpoints"].items()}
        wanted = config.epochs if config.epochs is not None else sorted(kept)
        absent = [e for e in wanted if e not in kept]
        if absent:
            raise ConfigError(f"{run_dir.name} kept no checkpoint for epoch(s) {absent} (kept: {sorted(kept)}); "
                              "the sweep's eval_epochs decide which are kept")
        cells += [(Cell(done["loss"], done["beta"], done["seed"], e), str(run_dir / kept[e]),
                   (Path("runs") / run_dir.name / kept[e]).as_posix()) for e in wanted]
    return cells


def resolve_backend(name: str) -> str:
    has_vllm = importlib.util.find_spec("vllm") is not None
    if name == "vllm" and not (has_vllm and torch.cuda.is_available()):
        raise ConfigError("backend=vllm needs the vllm package and a CUDA GPU; use backend=hf or auto")
    if name == "auto":
        return "vllm" if has_vllm and torch.cuda.is_available() else "hf"
    return name


def _load_lm(path: str, dtype: torch.dtype, device: torch.device):
    return load_causal_lm(path, dtype=dtype, device=device, eval_mode=True)


def _sample_vllm(path: str, tokenizer, prompt_ids, config: GenerateStageConfig, seed: int):
    """Sample with a fresh vLLM engine for ``path``, then free it (the next cell is another model)."""
    from chipo.generation import VLLMGenerator

    engine = VLLMGenerator(path, tokenizer, seed=seed, gpu_memory_utilization=config.vllm_gpu_memory_utilization)
    try:
        return engine.generate(prompt_ids, 1, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                               top_k=config.top_k, top_p=config.top_p, seed=seed)
    finally:
        del engine
        try:  # vLLM keeps a process group and its KV cache until told otherwise
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception as e:  # the API moves between vLLM versions; a leak only costs memory
            logger.debug("vLLM cleanup: %s", e)
        gc.collect()
        torch.cuda.empty_cache()


def cell_key(config: GenerateStageConfig, sft_model: str, subset: dict, cell: Cell, model_id: str) -> dict:
    """What decides a cell's samples: stored samples are reused only when their key is equal. (The backend and
    dtype are recorded but not part of it: they change the random stream, not the distribution sampled.)"""
    return {"model": model_id, "sft_model": sft_model, "prompts_sha256": subset["sha256"],
            "sampling": config.sampling(config.seed + (cell.seed or 0))}


class Generator:
    """Holds pi_ref, its tokenizer and the test subset; samples and scores one cell at a time."""

    def __init__(self, config: GenerateStageConfig, sft_model: str, prompts, references, subset: dict):
        from chipo.generation import encode_prompts
        from chipo.models import load_tokenizer

        self.config, self.sft_model, self.subset = config, sft_model, subset
        self.prompts, self.references = prompts, references
        self.backend = resolve_backend(config.backend)
        self.dtype = getattr(torch, config.dtype)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(sft_model)
        self.prompt_ids, _ = encode_prompts(self.tokenizer, prompts, config.max_prompt_length)
        self.ref = _load_lm(sft_model, self.dtype, self.device)

    def run(self, cell: Cell, model_path: str, model_id: str) -> tuple[list[dict], dict]:
        from chipo.generation import generate
        from chipo.lab.evaluate import divergence_stats, mean_se
        from chipo.sequences import sequence_logps

        c = self.config
        key = cell_key(c, self.sft_model, self.subset, cell, model_id)
        seed = key["sampling"]["seed"]
        start = time.perf_counter()
        is_ref = cell.loss == SFT.loss
        if self.backend == "vllm":
            gen = _sample_vllm(model_path, self.tokenizer, self.prompt_ids, c, seed)
            policy = self.ref if is_ref else _load_lm(model_path, self.dtype, self.device)
        else:
            policy = self.ref if is_ref else _load_lm(model_path, self.dtype, self.device)
            gen = generate(policy, self.tokenizer, self.prompt_ids, 1, max_new_tokens=c.max_new_tokens,
                           temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, batch_size=c.batch_size,
                           seed=seed)
        pad = self.tokenizer.pad_token_id
        prompt_ids = [self.prompt_ids[i] for i in gen.prompt_index]
        ref_logps = sequence_logps(self.ref, prompt_ids, gen.response_ids, pad,
                                   batch_size=c.logprob_batch_size).cpu()
        # pi_ref against itself: the log-ratio is exactly 0, no second pass.
        logps = ref_logps if is_ref else sequence_logps(policy, prompt_ids, gen.response_ids, pad,
                                                        batch_size=c.logprob_batch_size).cpu()
        del policy
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the next cell loads another policy (or a vLLM engine)
        log_ratio = logps.double() - ref_logps.double()
        rows = [{"index": i, "prompt": self.prompts[i], "reference": self.references[i], "completion": text,
                 "finished": done, "length": len(ids) - int(done), "logp": float(lp), "ref_logp": float(rlp),
                 "log_ratio": float(lr)}
                for i, text, ids, done, lp, rlp, lr in zip(gen.prompt_index, gen.texts, gen.response_ids,
                                                           gen.finished, logps.tolist(), ref_logps.tolist(),
                                                           log_ratio.tolist())]
        lengths = torch.tensor([r["length"] for r in rows], dtype=torch.float64).numpy()
        meta = {**cell.as_dict(), "key": key, "model": model_path, "sampling": key["sampling"], "prompts": self.subset,
                "backend": self.backend, "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                "n": len(rows), **divergence_stats(log_ratio),
                "finished_frac": sum(r["finished"] for r in rows) / len(rows), "seconds": time.perf_counter() - start}
        meta["length_mean"], meta["length_se"] = mean_se(lengths)
        return rows, meta


def stage_key(config: GenerateStageConfig, sft_model: str) -> dict:
    """What decides every cell's samples besides its model: generations/ holds one set of these settings
    (``regenerate=true`` replaces them, sampling again the cells made with the old ones)."""
    prompts = ("prompts_dataset", "prompts_split", "num_prompts", "prompt_field", "reference_field")
    return {"sft_model": sft_model, **{name: getattr(config, name) for name in prompts},
            **config.sampling(config.seed)}


def run_generate(config: GenerateStageConfig) -> dict:
    """Sample every cell not yet on disk; returns counts ``{"generated", "skipped", "cells"}``."""
    from chipo.train.experiment_dir import open_experiment

    layout = Layout(config.out_dir)
    sft_model = sft_model_of(config, layout)
    cells = policy_cells(config, layout, sft_model)
    prompts, references, subset = load_test_prompts(config)
    key = stage_key(config, sft_model)
    with open_experiment(layout.generations, key, overwrite=config.overwrite, replace_key=config.regenerate,
                         what="TL;DR generate stage", legacy_key=lambda d: key if only_cell_files(d) else None) as exp:
        counts = _generate(config, layout, sft_model, cells, prompts, references, subset)
        exp.finish({"cells": counts["cells"]})
    return counts


def _generate(config: GenerateStageConfig, layout: Layout, sft_model: str, cells, prompts, references,
              subset) -> dict:
    todo = []
    for cell, path, model_id in cells:
        samples, meta_path = layout.generation(cell)
        key = cell_key(config, sft_model, subset, cell, model_id)
        meta = read_json(meta_path)
        if meta is not None and samples.is_file() and meta.get("key") == key:
            continue
        if meta is not None and not config.regenerate:
            old = meta.get("key") or {}
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise ConfigError(f"{meta_path} was sampled with other settings ({', '.join(diff)}); set regenerate=true "
                              "to sample it again (and the judge stage will judge it again)")
        todo.append((cell, path, model_id))
    if todo:
        generator = Generator(config, sft_model, prompts, references, subset)
        for i, (cell, path, model_id) in enumerate(todo, 1):
            rows, meta = generator.run(cell, path, model_id)
            samples, meta_path = layout.generation(cell)
            write_jsonl(samples, rows)
            write_json(meta_path, meta)  # written last: its presence says the cell is complete
            logger.info("generate %d/%d: %s (%.0f s, KL k3 %.3g)", i, len(todo), cell.name, meta["seconds"],
                        meta["kl_k3"])
    return {"generated": len(todo), "skipped": len(cells) - len(todo), "cells": len(cells)}
