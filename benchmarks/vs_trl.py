"""chipo vs TRL DPOTrainer on identical work, fp32 on CPU (issue 6). Not part of the test suite.

    python benchmarks/vs_trl.py [--config compute|memory|both] [--repeats N] [--steps N] [--quick] [--profile]

What is identical: the Llama architecture and weights (built once, saved, loaded by every run), the tokenizer
(a WordLevel vocabulary built in code with the ``tokenizers`` library, so "prompt" + " response" tokenizes exactly
as prompt and response do separately -- TRL and chipo then see the same token sequences, checked below), the
preference pairs (one jsonl file), batch size, max_length, optimizer (``adamw_torch_fused``, linear schedule,
no warm-up, no weight decay, grad-norm clip 1.0), learning rate, number of steps, seed, DPO loss (beta 0.1), fp32,
no gradient checkpointing, no dataloader workers, logging every 10 steps.

TRL runs in its fastest applicable configuration: ``precompute_ref_log_probs=True`` (no reference forward in the
loop), ``bf16=False`` and ``gradient_checkpointing=False`` (TRL's defaults are True for both; bf16 is not fp32
and checkpointing only costs time here). chipo runs ``chipo train`` (``chipo.train.run.run_training``) with
``reference=precompute``: the first chipo run of a configuration builds the on-disk reference cache ("chipo
(cold)"), later ones hit it ("chipo"); they are reported separately, since a sweep reuses the cache.

Each run is its own subprocess (``--worker``), so peak RSS is that run's alone. The parent alternates TRL and
chipo (A B A B ...) and reports medians. Timed: ``trainer.train()`` only (own ``perf_counter`` timer; the
trainer's ``train_runtime`` is recorded too). Reported separately: model/tokenizer load, tokenization, reference
log-probs. Peak RSS: the whole process (``ru_maxrss``) and the training loop alone (``VmHWM`` after resetting it
through ``/proc/self/clear_refs`` right before ``train()``).

MFU: 6 N FLOPs per trained token (policy forward + backward; no reference forward in the loop), N = parameters
that take part in matmuls (all but the input embedding table), tokens = non-padding tokens of prompt + chosen and
prompt + rejected; against the fp32 matmul peak measured by this script in the same invocation.

Loss check: every run computes, with its trainer's own code, the per-example policy log-probs and DPO losses of
a fixed batch (the first ``batch`` rows) before training (policy == reference: log-probs must agree, losses are
log 2) and after training (losses must agree if both trajectories agree). The parent compares chipo's with
TRL's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]

CONFIGS = {
    # ~3.3M parameters, vocab 512: the model's matmuls dominate.
    "compute": {"vocab": 512, "hidden": 256, "layers": 4, "heads": 4, "intermediate": 640, "max_length": 160,
                "pairs": 512, "batch": 16, "steps": 32, "prompt": (8, 40), "response": (4, 150)},
    # vocab 32k, max_length 512: the B x T x V logits dominate memory.
    "memory": {"vocab": 32000, "hidden": 256, "layers": 4, "heads": 4, "intermediate": 640, "max_length": 512,
               "pairs": 64, "batch": 8, "steps": 8, "prompt": (16, 128), "response": (16, 480)},
}
QUICK = {
    "compute": {"pairs": 96, "steps": 6},
    "memory": {"max_length": 256, "pairs": 12, "batch": 4, "steps": 3, "prompt": (8, 64), "response": (8, 240)},
}
OPTIM = "adamw_torch_fused"
"""Pinned for both (chipo's PreferenceConfig.optim defaults to adamw_torch, transformers' to adamw_torch_fused)."""
COMMON = {"beta": 0.1, "learning_rate": 1e-4, "seed": 42, "logging_steps": 10}


# ----------------------------------------------------------------------------------------------- measurement


def vm_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else -1


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def matmul_peak_gflops(n: int = 1024, seconds: float = 3.0) -> float:
    """Best fp32 GFLOP/s of an n x n matmul over ``seconds`` on all intra-op threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b, out=c)
        best = max(best, 5 * 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


# ------------------------------------------------------------------------------------------------ assets


def build_assets(cfg: dict, directory: Path) -> dict:
    """Tokenizer + model saved to ``directory/model`` and the pairs to ``directory/train.jsonl``; token stats."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from chipo.toy import build_tiny_llama

    directory.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(cfg["vocab"] - len(SPECIAL_TOKENS))]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                        eos_token="<|eos|>", unk_token="<|unk|>", model_max_length=4096)
    model = build_tiny_llama(len(tokenizer), hidden_size=cfg["hidden"], num_layers=cfg["layers"],
                             num_heads=cfg["heads"], intermediate_size=cfg["intermediate"],
                             max_position_embeddings=max(1024, cfg["max_length"]),
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, seed=0)
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")

    # Zipf-distributed words; prompt lengths uniform, response lengths log-uniform (so they vary widely).
    rng = np.random.default_rng(0)
    ranks = np.arange(1, len(words) + 1)
    p = 1.0 / ranks
    p /= p.sum()

    def text(n: int) -> str:
        return " ".join(words[i] for i in rng.choice(len(words), size=n, p=p))

    def response_len() -> int:
        lo, hi = cfg["response"]
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))

    rows, real_tokens, truncated = [], 0, 0
    for _ in range(cfg["pairs"]):
        lp = int(rng.integers(cfg["prompt"][0], cfg["prompt"][1] + 1))
        lc, lr = response_len(), response_len()
        # The leading space makes "prompt + response" tokenize as prompt then response (TRL concatenates).
        rows.append({"prompt": text(lp), "chosen": " " + text(lc), "rejected": " " + text(lr)})
        for n in (lc, lr):
            real_tokens += min(lp + n + 1, cfg["max_length"])  # + EOS; both trainers keep the first max_length
            truncated += lp + n + 1 > cfg["max_length"]
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return {"params": sum(p.numel() for p in model.parameters()), "matmul_params": n_matmul,
            "tokens_per_pair": real_tokens / cfg["pairs"], "truncated_responses": truncated}


# ------------------------------------------------------------------------------------------------ workers


def _fixed_rows_chipo(trainer, n: int) -> dict:
    import torch

    rows = [trainer.train_dataset[i] for i in range(n)]
    batch = {k: v.to(trainer.args.device) for k, v in trainer.data_collator(rows).items()}
    was_training = trainer.model.training
    trainer.model.eval()
    with torch.no_grad():
        losses, metrics = trainer.pair_losses(trainer.model, batch)
    trainer.model.train(was_training)
    return {"loss": losses.tolist(), "logps_chosen": metrics["logps/chosen"].tolist(),
            "logps_rejected": metrics["logps/rejected"].tolist()}


def _fixed_rows_trl(trainer, n: int) -> dict:
    import torch

    out = {"loss": [], "logps_chosen": [], "logps_rejected": []}
    was_training = trainer.model.training
    trainer.model.eval()
    with torch.no_grad():
        for i in range(n):  # one-row batches: TRL's compute_loss returns the batch mean
            batch = {k: v.to(trainer.args.device) for k, v in trainer.data_collator([trainer.train_dataset[i]]).items()}
            out["loss"].append(float(trainer.compute_loss(trainer.model, batch)))
            chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)  # TRL's log-probs of any model
            out["logps_chosen"].append(float(chosen[0]))
            out["logps_rejected"].append(float(rejected[0]))
    trainer.model.train(was_training)
    return out


def _timed_train(trainer, super_train, result: dict, spec: dict, fixed_rows):
    """Run ``super_train()`` between timers; fixed-batch checks before and after (outside the timer)."""
    import torch

    n = spec["batch"]
    result["fixed_before"] = fixed_rows(trainer, n)
    result["matmul_peak_before_gflops"] = matmul_peak_gflops(seconds=1.5)  # the machine's state for this run
    result["rss_before_train_kb"] = vm_kb("VmRSS")
    result["train_peak_rss_reset"] = reset_peak_rss()
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        torch_prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        torch_prof.__enter__()
        profiler.enable()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    output = super_train()
    result["train_s"] = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF)
    result["train_rusage"] = {"user_s": after.ru_utime - usage.ru_utime, "sys_s": after.ru_stime - usage.ru_stime,
                              "minor_faults": after.ru_minflt - usage.ru_minflt,
                              "major_faults": after.ru_majflt - usage.ru_majflt}
    if profiler is not None:
        profiler.disable()
        torch_prof.__exit__(None, None, None)
        _write_profile(spec, profiler, torch_prof)
    result["train_peak_rss_kb"] = vm_kb("VmHWM")
    result["matmul_peak_after_gflops"] = matmul_peak_gflops(seconds=1.5)
    result["train_runtime"] = output.metrics.get("train_runtime")
    result["global_step"] = trainer.state.global_step
    result["log_history"] = [{k: v for k, v in r.items() if k in ("step", "loss", "rewards/margins")}
                             for r in trainer.state.log_history if "loss" in r]
    result["fixed_after"] = fixed_rows(trainer, n)
    return output


def _write_profile(spec: dict, profiler, torch_prof) -> None:
    import io
    import pstats

    path = Path(spec["profile"])
    s = io.StringIO()
    pstats.Stats(profiler, stream=s).sort_stats("cumulative").print_stats(45)
    ops = torch_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    path.write_text(f"# torch.profiler, ops by self CPU time ({spec['trainer']})\n{ops}\n\n"
                    f"# cProfile, by cumulative time ({spec['trainer']})\n{s.getvalue()}")


def worker_chipo(spec: dict, result: dict) -> None:
    import chipo.train.preference_setup as setup
    import chipo.train.run as run
    from chipo.config import load_config
    from chipo.train.config import PreferenceConfig

    t0 = time.perf_counter()
    timings = result.setdefault("phases_s", {})
    original_prepare, original_ref, original_cache = run.prepare_split, setup.add_reference_logps, \
        setup.cached_reference_logps

    def prepare_split(*args, **kwargs):
        t = time.perf_counter()
        out = original_prepare(*args, **kwargs)
        timings["tokenize"] = timings.get("tokenize", 0.0) + time.perf_counter() - t
        return out

    def add_reference_logps(*args, **kwargs):
        t = time.perf_counter()
        out = original_ref(*args, **kwargs)
        timings["reference"] = time.perf_counter() - t
        return out

    def cached_reference_logps(*args, **kwargs):
        out = original_cache(*args, **kwargs)
        result["ref_cache_hit"] = bool(out[2])
        return out

    class TimedPreferenceTrainer(run.PreferenceTrainer):
        def train(self, *args, **kwargs):
            timings["setup_before_train"] = time.perf_counter() - t0
            return _timed_train(self, lambda: super(TimedPreferenceTrainer, self).train(*args, **kwargs),
                                result, spec, _fixed_rows_chipo)

    # run_training calls prepare_split; the reference pass lives in preference_setup (called by the trainer).
    run.prepare_split, setup.add_reference_logps, setup.cached_reference_logps = \
        prepare_split, add_reference_logps, cached_reference_logps
    run.PreferenceTrainer = TimedPreferenceTrainer
    config = load_config(PreferenceConfig, overrides=spec["chipo_overrides"])
    result["logprobs_impl_requested"] = config.logprobs_impl
    run.run_training(config)


def trl_config(spec: dict):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=spec["output_dir"], beta=COMMON["beta"], loss_type=["sigmoid"], max_length=spec["max_length"],
        per_device_train_batch_size=spec["batch"], per_device_eval_batch_size=spec["batch"],
        max_steps=spec["steps"], learning_rate=COMMON["learning_rate"], lr_scheduler_type="linear",
        optim=OPTIM, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=COMMON["seed"], bf16=False, fp16=False,
        gradient_checkpointing=False, precompute_ref_log_probs=True, logging_steps=COMMON["logging_steps"],
        logging_first_step=True, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False,
    )


def worker_trl(spec: dict, result: dict) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    timings = result.setdefault("phases_s", {})
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    dataset = datasets.load_dataset("json", data_files=spec["data"], split="train")
    timings["load"] = time.perf_counter() - t0

    class TimedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, *args, **kwargs):
            t = time.perf_counter()
            out = super()._prepare_dataset(*args, **kwargs)
            timings["tokenize"] = timings.get("tokenize", 0.0) + time.perf_counter() - t
            return out

        def _precompute_ref_logps(self, *args, **kwargs):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            timings["reference"] = timings.get("reference", 0.0) + time.perf_counter() - t
            return out

        def train(self, *args, **kwargs):
            timings["setup_before_train"] = time.perf_counter() - t0
            return _timed_train(self, lambda: super(TimedDPOTrainer, self).train(*args, **kwargs),
                                result, spec, _fixed_rows_trl)

    trainer = TimedDPOTrainer(model=model, args=trl_config(spec), train_dataset=dataset, processing_class=tokenizer)
    trainer.train()


def worker_main(spec_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"trainer": spec["trainer"], "torch_threads": torch.get_num_threads()}
    t = time.perf_counter()
    try:
        {"chipo": worker_chipo, "trl": worker_trl}[spec["trainer"]](spec, result)
    finally:
        result["process_s"] = time.perf_counter() - t
        result["process_peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ parent


def chipo_overrides(spec: dict) -> list[str]:
    return [f"model={spec['model_dir']}", f"dataset={spec['data']}", f"output_dir={spec['output_dir']}",
            "overwrite_output_dir=true", "loss=dpo", f"beta={COMMON['beta']}", f"max_length={spec['max_length']}",
            f"per_device_train_batch_size={spec['batch']}", f"per_device_eval_batch_size={spec['batch']}",
            f"max_steps={spec['steps']}", f"learning_rate={COMMON['learning_rate']}", "lr_scheduler_type=linear",
            "warmup_ratio=0.0", "weight_decay=0.0", "max_grad_norm=1.0", f"seed={COMMON['seed']}",
            f"optim={OPTIM}", "reference=precompute", f"ref_cache_dir={spec['ref_cache_dir']}",
            f"logging_steps={COMMON['logging_steps']}", "save_strategy=no", "report_to=none", "disable_tqdm=true",
            "dataloader_num_workers=0", *spec.get("chipo_extra", [])]


def run_worker(spec: dict, workdir: Path, tag: str) -> dict:
    spec = dict(spec, result=str(workdir / f"{tag}.result.json"), output_dir=str(workdir / f"{tag}.out"))
    if spec["trainer"] == "chipo":
        spec["chipo_overrides"] = chipo_overrides(spec)
    spec_path = workdir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_DISABLED="true", HF_DATASETS_CACHE=str(workdir / "hf_datasets_cache"), TQDM_DISABLE="1")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t
    (workdir / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed (exit {proc.returncode}); log: {workdir / f'{tag}.log'}\n"
                           f"{proc.stderr[-3000:]}")
    result = json.loads(Path(spec["result"]).read_text())
    result["wall_s"] = wall
    result["children_maxrss_kb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if spec["trainer"] == "chipo":
        result["command"] = "chipo train " + " ".join(spec["chipo_overrides"])
    return result


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


FAST = 0.8
"""A run counts as "fast phase" when its training loop kept FAST x its torch threads busy: (user + sys CPU time) /
wall time >= FAST * threads. On the shared VM this was measured on, slow phases show as ~1 busy core of 2 (the
matmul probes before/after a run can miss a slowdown in between)."""


def _fast_phase(rs: list[dict], samples: int, best_peak: float) -> dict:
    def cores(r: dict) -> float:
        return (r["train_rusage"]["user_s"] + r["train_rusage"]["sys_s"]) / r["train_s"]

    fast = [r for r in rs if cores(r) >= FAST * r.get("torch_threads", 2)]
    if not fast:
        return {"runs": 0}
    return {"runs": len(fast), "samples_per_s": samples / statistics.median(r["train_s"] for r in fast)}


def _raw(r: dict) -> dict:
    keys = ("train_s", "train_runtime", "matmul_peak_before_gflops", "matmul_peak_after_gflops", "train_peak_rss_kb",
            "process_peak_rss_kb", "phases_s", "train_rusage", "ref_cache_hit", "global_step")
    return {k: r.get(k) for k in keys}


def summarize(name: str, cfg: dict, stats: dict, runs: dict, peaks: list[float]) -> dict:
    best_peak = max([*peaks] + [max(r["matmul_peak_before_gflops"], r["matmul_peak_after_gflops"])
                                for rs in runs.values() for r in rs])
    peak = max(peaks) or best_peak  # rendered from run files: no parent probes, use the runs' best
    samples = cfg["steps"] * cfg["batch"]
    tokens = samples * stats["tokens_per_pair"]
    rows = {}
    for label, rs in runs.items():
        if not rs:
            continue
        train_s = statistics.median(r["train_s"] for r in rs)
        tps = tokens / train_s
        run_peaks = [(r["matmul_peak_before_gflops"] + r["matmul_peak_after_gflops"]) / 2 for r in rs]
        rows[label] = {
            "runs": len(rs),
            "train_s": [round(r["train_s"], 2) for r in rs],
            "samples_per_s": samples / train_s,
            "tokens_per_s": tps,
            "mfu": 6 * stats["matmul_params"] * tps / (peak * 1e9),
            "run_matmul_peaks_gflops": [f"{r['matmul_peak_before_gflops']:.0f}/{r['matmul_peak_after_gflops']:.0f}"
                                        for r in rs],
            "mfu_vs_run_peak": statistics.median(6 * stats["matmul_params"] * tokens / r["train_s"] / (q * 1e9)
                                                 for r, q in zip(rs, run_peaks)),
            "fast_phase": _fast_phase(rs, samples, best_peak),
            "train_peak_rss_mb": statistics.median(r["train_peak_rss_kb"] for r in rs) / 1024,
            "process_peak_rss_mb": statistics.median(r["process_peak_rss_kb"] for r in rs) / 1024,
            "phases_s": {k: round(statistics.median(r["phases_s"].get(k, 0.0) for r in rs), 2)
                         for k in sorted({k for r in rs for k in r["phases_s"]})},
            "trainer_train_runtime": [r.get("train_runtime") for r in rs],
            "ref_cache_hit": [r.get("ref_cache_hit") for r in rs],
        }
    checks = {}
    trl = runs["trl"][0] if runs.get("trl") else None
    for label in ("chipo (cold)", "chipo"):
        if trl is None or not runs.get(label):
            continue
        ours = runs[label][0]
        checks[label] = {
            "before: max |d logp|": max(max_abs_diff(ours["fixed_before"][k], trl["fixed_before"][k])
                                        for k in ("logps_chosen", "logps_rejected")),
            "before: max |d loss|": max_abs_diff(ours["fixed_before"]["loss"], trl["fixed_before"]["loss"]),
            "after: max |d loss|": max_abs_diff(ours["fixed_after"]["loss"], trl["fixed_after"]["loss"]),
            "after: loss range (TRL)": [min(trl["fixed_after"]["loss"]), max(trl["fixed_after"]["loss"])],
            "logged losses (step, chipo, TRL)": [
                (a["step"], round(a["loss"], 6), round(b["loss"], 6))
                for a, b in zip(ours["log_history"], trl["log_history"])],
        }
    return {"config": name, "settings": cfg, "data": stats, "matmul_peak_gflops": peak, "results": rows,
            "loss_checks": checks, "runs_raw": {label: [_raw(r) for r in rs] for label, rs in runs.items()}}


def _fmt_fast(fast: dict) -> str:
    return f"{fast['samples_per_s']:.1f} ({fast['runs']})" if fast["runs"] else "- (0)"


def markdown(summary: dict) -> str:
    from chipo.markdown import markdown_table

    cfg, res = summary["settings"], summary["results"]
    lines = [f"### {summary['config']}: vocab {cfg['vocab']}, max_length {cfg['max_length']}, "
             f"{summary['data']['params'] / 1e6:.2f}M params ({summary['data']['matmul_params'] / 1e6:.2f}M in "
             f"matmuls), {cfg['pairs']} pairs, batch {cfg['batch']}, {cfg['steps']} steps; matmul peak "
             f"{summary['matmul_peak_gflops']:.0f} GFLOP/s", "",
             markdown_table(
                 ["run", "n", "train s (each)", "samples/s", "tokens/s", "MFU",
                  "MFU vs run's mean probe (probes before/after)", "samples/s, fast-phase runs (n)",
                  "peak RSS train loop", "peak RSS process", "tokenize s", "reference s"],
                 [[label, r["runs"], ", ".join(f"{x:.1f}" for x in r["train_s"]), f"{r['samples_per_s']:.1f}",
                   f"{r['tokens_per_s']:.0f}", f"{100 * r['mfu']:.1f}%",
                   f"{100 * r['mfu_vs_run_peak']:.1f}% ({', '.join(map(str, r['run_matmul_peaks_gflops']))})",
                   _fmt_fast(r["fast_phase"]), f"{r['train_peak_rss_mb']:.0f} MB",
                   f"{r['process_peak_rss_mb']:.0f} MB", f"{r['phases_s'].get('tokenize', 0):.2f}",
                   f"{r['phases_s'].get('reference', 0):.2f}"] for label, r in res.items()])]
    for label in ("chipo", GROUPED):
        if "trl" in res and label in res:
            ours, trl = res[label], res["trl"]
            fast = (f", x{ours['fast_phase']['samples_per_s'] / trl['fast_phase']['samples_per_s']:.2f} on "
                    f"fast-phase runs" if ours["fast_phase"]["runs"] and trl["fast_phase"]["runs"] else "")
            lines += ["", f"{label} / TRL: samples/s x{ours['samples_per_s'] / trl['samples_per_s']:.2f} "
                          f"(x{ours['mfu_vs_run_peak'] / trl['mfu_vs_run_peak']:.2f} normalised by each run's matmul "
                          f"peak{fast}), "
                          f"train-loop peak RSS x{ours['train_peak_rss_mb'] / trl['train_peak_rss_mb']:.2f}, "
                          f"process peak RSS x{ours['process_peak_rss_mb'] / trl['process_peak_rss_mb']:.2f}"]
    for label, c in summary["loss_checks"].items():
        lines += ["", f"Loss check {label} vs TRL: before training max |d logp| = {c['before: max |d logp|']:.2e}, "
                      f"max |d loss| = {c['before: max |d loss|']:.2e}; after training max |d loss| = "
                      f"{c['after: max |d loss|']:.2e} (TRL losses in [{c['after: loss range (TRL)'][0]:.4f}, "
                      f"{c['after: loss range (TRL)'][1]:.4f}]); logged (step, chipo, TRL): "
                      f"{c['logged losses (step, chipo, TRL)']}"]
    return "\n".join(lines)


def environment() -> dict:
    import torch
    import transformers
    import trl

    import chipo

    model = "?"
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "chipo": getattr(chipo, "__version__", "?")}


GROUPED = "chipo group_by_length=true"


def run_config(name: str, cfg: dict, repeats: int, workdir: Path, profile: bool, grouped: bool) -> dict:
    print(f"\n== {name}: building model, tokenizer and data", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    stats = build_assets(cfg, workdir / "assets")
    print(f"   {stats}", flush=True)
    peaks = [matmul_peak_gflops()]
    print(f"   matmul peak {peaks[0]:.1f} GFLOP/s", flush=True)
    spec = {"model_dir": str(workdir / "assets" / "model"), "data": str(workdir / "assets" / "train.jsonl"),
            "ref_cache_dir": str(workdir / "chipo_ref_cache"), "max_length": cfg["max_length"],
            "batch": cfg["batch"], "steps": cfg["steps"]}
    runs: dict[str, list] = {"trl": [], "chipo (cold)": [], "chipo": [], GROUPED: []}
    order = [("chipo", "chipo (cold)")]  # builds the reference cache; reported on its own
    for _ in range(repeats):
        order += [("trl", "trl"), ("chipo", "chipo")]  # A B A B
        if grouped:
            order.append(("chipo", GROUPED))
    for i, (trainer, label) in enumerate(order):
        extra = {"chipo_extra": ["group_by_length=true"]} if label == GROUPED else {}
        result = run_worker(dict(spec, trainer=trainer, **extra), workdir, f"{i:02d}-{trainer}")
        runs[label].append(result)
        print(f"   {label:13s} train {result['train_s']:7.2f} s  steps {result['global_step']}  "
              f"peak RSS loop {result['train_peak_rss_kb'] / 1024:7.0f} MB  process "
              f"{result['process_peak_rss_kb'] / 1024:7.0f} MB  phases {result['phases_s']}  "
              f"train rusage {result['train_rusage']}  matmul peak {result['matmul_peak_before_gflops']:.0f}/"
              f"{result['matmul_peak_after_gflops']:.0f}", flush=True)
        if trainer == "chipo" and label == "chipo (cold)" and result.get("ref_cache_hit"):
            print("   warning: the cold chipo run hit the reference cache", flush=True)
    if profile:
        for trainer in ("chipo", "trl"):
            path = HERE / f"profile_{name}_{trainer}.txt"
            run_worker(dict(spec, trainer=trainer, profile=str(path)), workdir, f"profile-{trainer}")
            print(f"   profile written to {path}", flush=True)
    peaks.append(matmul_peak_gflops())
    summary = summarize(name, cfg, stats, runs, peaks)
    summary["matmul_peaks_gflops"] = peaks
    summary["chipo_command"] = runs["chipo"][0]["command"] if runs["chipo"] else None
    return summary


def render_dir(workdir: Path, name: str) -> dict:
    """Re-summarize a finished (or interrupted) invocation from its per-run result files."""
    from safetensors import safe_open

    directory = workdir / name
    runs: dict[str, list] = {"trl": [], "chipo (cold)": [], "chipo": [], GROUPED: []}
    spec = None
    for spec_path in sorted(directory.glob("[0-9][0-9]-*.spec.json")):
        spec = json.loads(spec_path.read_text())
        result_path = Path(spec["result"])
        if not result_path.is_file():
            continue
        result = json.loads(result_path.read_text())
        if spec["trainer"] == "trl":
            label = "trl"
        elif spec.get("chipo_extra"):
            label = GROUPED
        else:
            label = "chipo" if runs["chipo (cold)"] else "chipo (cold)"
        if spec["trainer"] == "chipo":
            result["command"] = "chipo train " + " ".join(spec["chipo_overrides"])
        runs[label].append(result)
    if spec is None:
        raise SystemExit(f"no runs under {directory}")
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    cfg = dict(CONFIGS[name], pairs=len(rows), steps=spec["steps"], batch=spec["batch"],
               max_length=spec["max_length"])
    real = sum(min(len(r["prompt"].split()) + len(r[k].split()) + 1, cfg["max_length"])
               for r in rows for k in ("chosen", "rejected"))
    with safe_open(str(Path(spec["model_dir"]) / "model.safetensors"), "pt") as f:
        shapes = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    stats = {"params": sum(shapes.values()),
             "matmul_params": sum(v for k, v in shapes.items() if "embed_tokens" not in k),
             "tokens_per_pair": real / len(rows)}
    summary = summarize(name, cfg, stats, runs, [0.0])
    summary["chipo_command"] = runs["chipo"][0]["command"] if runs["chipo"] else None
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["compute", "memory", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=2, help="TRL/chipo (cached) pairs per configuration")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per configuration)")
    parser.add_argument("--quick", action="store_true", help="small smoke run (~2 minutes)")
    parser.add_argument("--profile", action="store_true", help="also profile one chipo and one TRL run")
    parser.add_argument("--grouped", action="store_true",
                        help="also time chipo with group_by_length=true (a different sample order: same samples per "
                             "epoch, less padding; its loss trajectory is not comparable to TRL's)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a new temporary one)")
    parser.add_argument("--out", default=None, help="write the JSON summary here")
    parser.add_argument("--render", default=None, metavar="WORKDIR",
                        help="re-summarize the runs of an earlier --workdir and print the tables")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return

    names = ["compute", "memory"] if args.config == "both" else [args.config]
    if args.render:
        for name in names:
            if (Path(args.render) / name).is_dir():
                print("\n" + markdown(render_dir(Path(args.render), name)))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chipo-vs-trl-"))
    env = environment()
    print(f"environment: {env}\nscratch: {workdir}", flush=True)
    summaries = []
    for name in names:
        cfg = dict(CONFIGS[name], **(QUICK[name] if args.quick else {}))
        if args.steps:
            cfg["steps"] = args.steps
        summaries.append(run_config(name, cfg, 1 if args.quick else args.repeats, workdir / name, args.profile,
                                    args.grouped))
        print("\n" + markdown(summaries[-1]), flush=True)
    report = {"environment": env, "argv": sys.argv, "summaries": summaries}
    out = Path(args.out) if args.out else workdir / "summary.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\nsummary: {out}")


if __name__ == "__main__":
    main()
