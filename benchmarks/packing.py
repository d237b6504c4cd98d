"""chipo padding-free packing vs length buckets vs TRL DPOTrainer, and ``torch_compile``, on the compute config.

    python benchmarks/packing.py [--repeats N] [--compile] [--reference-compile] [--workdir DIR] [--out FILE]

Whole processes, as ``vs_trl.py`` runs them (same assets, same TRL configuration, same ``chipo train`` command,
same timers, peak RSS and fixed-batch loss checks), for these variants, alternated in every repeat so that the
shared machine's drift hits all of them alike:

  trl                 TRL DPOTrainer, precomputed reference, fp32
  chipo buckets       chipo train as configured by default then (padding_buckets=4, packing=false)
  chipo packing       chipo train packing=true (padding-free rows, see chipo.sequences.pack_batch)
  --compile adds      chipo train torch_compile=true with buckets, and with packing

The load average (1 min) is recorded before and after each run: other processes compete for the 2 cores.
``--reference-compile`` times the reference pass (all pairs' log-probs under no_grad, as ``reference=precompute``
does) eagerly vs ``torch.compile(model, dynamic=True)``, alternated, compile time reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402

VARIANTS = {"chipo buckets": ["packing=false", "padding_buckets=4"], "chipo packing": ["packing=true"]}
COMPILED = {"chipo buckets + compile": ["packing=false", "padding_buckets=4", "torch_compile=true"],
            "chipo packing + compile": ["packing=true", "torch_compile=true"]}


def whole_runs(cfg: dict, workdir: Path, repeats: int, compile_: bool) -> dict:
    stats = vs_trl.build_assets(cfg, workdir / "assets")
    peaks = [vs_trl.matmul_peak_gflops()]
    spec = {"model_dir": str(workdir / "assets" / "model"), "data": str(workdir / "assets" / "train.jsonl"),
            "ref_cache_dir": str(workdir / "chipo_ref_cache"), "max_length": cfg["max_length"],
            "batch": cfg["batch"], "steps": cfg["steps"]}
    variants = dict(VARIANTS, **(COMPILED if compile_ else {}))
    order = [("chipo", "chipo (cold)", VARIANTS["chipo buckets"])]  # fills the reference cache
    for _ in range(repeats):
        order += [("trl", "trl", [])] + [("chipo", label, extra) for label, extra in variants.items()]
    runs: dict[str, list] = {label: [] for _, label, _ in order}
    for i, (trainer, label, extra) in enumerate(order):
        load_before = os.getloadavg()[0]
        result = vs_trl.run_worker(dict(spec, trainer=trainer, chipo_extra=extra), workdir, f"{i:02d}-{trainer}")
        result["loadavg_1min"] = [load_before, os.getloadavg()[0]]
        runs[label].append(result)
        print(f"   {label:24s} train {result['train_s']:7.2f} s  load {load_before:.1f}/{os.getloadavg()[0]:.1f}  "
              f"probes {result['matmul_peak_before_gflops']:.0f}/{result['matmul_peak_after_gflops']:.0f}  "
              f"rusage {result['train_rusage']}", flush=True)
    peaks.append(vs_trl.matmul_peak_gflops())
    summary = vs_trl.summarize("compute", cfg, stats, runs, peaks)
    # Per repeat: each chipo variant's train time relative to the TRL run of the same repeat (adjacent runs).
    per_repeat = {label: [trl["train_s"] / r["train_s"] for trl, r in zip(runs["trl"], runs[label])]
                  for label in variants}
    checks = {label: {
        "before: max |d logp|": max(vs_trl.max_abs_diff(runs[label][0]["fixed_before"][k],
                                                        runs["trl"][0]["fixed_before"][k])
                                    for k in ("logps_chosen", "logps_rejected")),
        "before: max |d loss|": vs_trl.max_abs_diff(runs[label][0]["fixed_before"]["loss"],
                                                    runs["trl"][0]["fixed_before"]["loss"]),
        "after: max |d loss|": vs_trl.max_abs_diff(runs[label][0]["fixed_after"]["loss"],
                                                   runs["trl"][0]["fixed_after"]["loss"]),
        "logged (step, chipo, TRL)": [(a["step"], round(a["loss"], 6), round(b["loss"], 6)) for a, b in
                                      zip(runs[label][0]["log_history"], runs["trl"][0]["log_history"])]}
        for label in variants}
    summary.update(speedup_vs_trl_per_repeat=per_repeat, variant_checks=checks,
                   loadavg={label: [r["loadavg_1min"] for r in rs] for label, rs in runs.items()})
    return summary


def reference_compile(cfg: dict, workdir: Path, rounds: int) -> dict:
    """Eager vs compiled reference pass over all pairs (no_grad), alternated; the first compiled pass compiles."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chipo.data import PreferenceCollator, prepare_preference_dataset
    from chipo.sequences import batch_sequence_logps

    vs_trl.build_assets(cfg, workdir / "assets")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "assets" / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "assets" / "model").eval()
    rows = load_dataset("json", data_files=str(workdir / "assets" / "train.jsonl"), split="train")
    prepared, _ = prepare_preference_dataset(rows, tokenizer, source="bench", max_length=cfg["max_length"])
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    batches = [collate([prepared[i] for i in range(s, min(s + 64, len(prepared)))])
               for s in range(0, len(prepared), 64)]  # the reference pass's batch of 64 pairs
    compiled = torch.compile(model, dynamic=True)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    first_compiled = None
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, m in (("eager", model), ("compiled", compiled)):
                t = time.perf_counter()
                for b in batches:
                    batch_sequence_logps(m, b, "fused", max_buckets=4)
                elapsed = time.perf_counter() - t
                if name == "compiled" and r == 0:
                    first_compiled = elapsed  # includes compilation (and recompiles per bucket shape)
                elif r > 0 or name == "eager":
                    times[name].append(elapsed)
                print(f"   reference pass {name:8s} round {r}: {elapsed:.2f} s  load {os.getloadavg()[0]:.1f}",
                      flush=True)
    return {"eager_s": times["eager"], "compiled_s": times["compiled"], "first_compiled_s": first_compiled,
            "pairs": len(prepared)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time chipo with torch_compile=true")
    parser.add_argument("--reference-compile", action="store_true",
                        help="only time the reference pass eager vs torch.compile")
    parser.add_argument("--rounds", type=int, default=2, help="reference-compile: timed passes per variant")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        vs_trl.worker_main(args.worker)
        return
    cfg = dict(vs_trl.CONFIGS["compute"])
    if args.steps:
        cfg["steps"] = args.steps
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chipo-packing-"))
    env = vs_trl.environment()
    print(f"environment: {env}\nscratch: {workdir}\nload average: {os.getloadavg()}", flush=True)
    if args.reference_compile:
        report = {"environment": env, "reference_compile": reference_compile(cfg, workdir / "ref", args.rounds)}
    else:
        summary = whole_runs(cfg, workdir / "compute", args.repeats, args.compile)
        print("\n" + vs_trl.markdown(summary))
        print("\nper-repeat speed-up vs the adjacent TRL run:",
              {k: [round(x, 2) for x in v] for k, v in summary["speedup_vs_trl_per_repeat"].items()})
        print("median:", {k: round(statistics.median(v), 2) for k, v in summary["speedup_vs_trl_per_repeat"].items()})
        print("loss checks:", json.dumps(summary["variant_checks"], indent=1))
        report = {"environment": env, "argv": sys.argv, "summary": summary}
    out = Path(args.out) if args.out else workdir / "summary.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\nsummary: {out}")


if __name__ == "__main__":
    main()
