"""Interleaved per-step A/B in ONE process: TRL vs chipo ``training_step`` on the same batches (compute config).

    python benchmarks/step_ab.py [--batches N] [--rounds R] [--config compute|memory]

Why: on a shared 2-core VM the machine's speed drifts by up to 3x over minutes (see RESULTS.md), which swamps
whole-run comparisons. Here every round times one forward+backward (``Trainer.training_step``, no optimizer step)
of each variant on its batch, in turn, so drift hits all variants alike; the report is the median over rounds of
each variant's time relative to TRL's in the same round.

Variants (same 512 rows, same model weights, same reference log-probs, batch 16 pairs):
  trl            TRL DPOTrainer (precompute_ref_log_probs, fp32), batches of a fixed random permutation
  chipo          chipo PreferenceTrainer (loss=dpo, fused log-probs), the same batches
  chipo-grouped  chipo, batches of the same permutation regrouped by length (rows sorted by padded length, then
                 cut into batches of 16): what ``group_by_length=true`` does to padding
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from chipo.markdown import markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["compute", "memory"], default="compute")
    parser.add_argument("--batches", type=int, default=16, help="distinct batches per variant")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the batches")
    args = parser.parse_args()

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from trl import DPOTrainer

    from chipo.data import PreferenceCollator, prepare_preference_dataset
    from chipo.train import PreferenceTrainer

    cfg = vs_trl.CONFIGS[args.config]
    work = Path(tempfile.mkdtemp(prefix="step-ab-"))
    stats = vs_trl.build_assets(cfg, work)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    rows = datasets.load_dataset("json", data_files=str(work / "train.jsonl"), split="train")
    spec = {"output_dir": str(work / "trl"), "max_length": cfg["max_length"], "batch": cfg["batch"], "steps": 1}
    trl_trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(work / "model"), args=vs_trl.trl_config(spec),
                             train_dataset=rows, processing_class=tokenizer)
    trl_ds = trl_trainer.train_dataset

    prepared, _ = prepare_preference_dataset(rows, tokenizer, source="bench", max_length=cfg["max_length"])
    prepared = prepared.add_column("ref_chosen_logps", trl_ds["ref_chosen_logps"])
    prepared = prepared.add_column("ref_rejected_logps", trl_ds["ref_rejected_logps"])
    chipo = PreferenceTrainer(
        model=AutoModelForCausalLM.from_pretrained(work / "model"),
        args=TrainingArguments(output_dir=str(work / "chipo"), report_to="none", use_cpu=True,
                               remove_unused_columns=False, per_device_train_batch_size=cfg["batch"]),
        train_dataset=prepared, data_collator=PreferenceCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer, loss_name="dpo", beta=vs_trl.COMMON["beta"], logprobs_impl="fused")
    # Same model and batches, but each batch runs as up to 4 length buckets (chipo's default padding_buckets).
    chipo_buckets = PreferenceTrainer(
        model=chipo.model, args=chipo.args, train_dataset=prepared, data_collator=chipo.data_collator,
        processing_class=tokenizer, loss_name="dpo", beta=vs_trl.COMMON["beta"], logprobs_impl="fused",
        padding_buckets=4)

    b = cfg["batch"]
    n = min(len(prepared), args.batches * b)
    order = torch.randperm(len(prepared), generator=torch.Generator().manual_seed(0))[:n].tolist()
    length = {i: len(prepared[i]["prompt_input_ids"]) + max(len(prepared[i]["chosen_input_ids"]),
                                                            len(prepared[i]["rejected_input_ids"])) for i in order}
    grouped_order = sorted(order, key=length.__getitem__)
    batches = {
        "trl": [trl_trainer.data_collator([trl_ds[i] for i in order[s:s + b]]) for s in range(0, n, b)],
        "chipo": [chipo.data_collator([prepared[i] for i in order[s:s + b]]) for s in range(0, n, b)],
        "chipo-grouped": [chipo.data_collator([prepared[i] for i in grouped_order[s:s + b]])
                          for s in range(0, n, b)],
    }
    batches["chipo-buckets"] = batches["chipo"]
    for name, bs in batches.items():
        padded = sum(x["input_ids"].numel() for x in bs)
        real = sum(int(x["attention_mask"].sum()) for x in bs)
        print(f"{name:14s} {len(bs)} batches, {real} real tokens, {padded} padded positions "
              f"({100 * real / padded:.0f}% real)")
    trainers = {"trl": trl_trainer, "chipo": chipo, "chipo-grouped": chipo, "chipo-buckets": chipo_buckets}
    for trainer in (trl_trainer, chipo, chipo_buckets):
        trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer.train()
        trainer.model.train()
        trainer.training_step(trainer.model, batches["trl" if trainer is trl_trainer else "chipo"][0])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in batches}
    for _ in range(args.rounds):
        for j in range(len(batches["trl"])):
            for name in batches:  # interleaved: one step of each variant per round
                trainer = trainers[name]
                t = time.perf_counter()
                trainer.training_step(trainer.model, batches[name][j])
                times[name].append(time.perf_counter() - t)
                trainer.model.zero_grad(set_to_none=True)
    totals = {k: sum(v) for k, v in times.items()}
    print(f"\nconfig {args.config}: {stats['params'] / 1e6:.2f}M params, batch {b}, {len(times['trl'])} steps per "
          f"variant (interleaved), forward+backward only")
    print(markdown_table(
        ["variant", "total s", "median step s", "median step time / TRL's same round", "samples/s (fwd+bwd)"],
        [[name, f"{totals[name]:.1f}", f"{statistics.median(ts):.3f}",
          f"{statistics.median(t / r for t, r in zip(ts, times['trl'])):.2f}", f"{len(ts) * b / totals[name]:.1f}"]
         for name, ts in times.items()]))
    print(f"\nspeed-up vs TRL (total time): chipo x{totals['trl'] / totals['chipo']:.2f}, chipo-grouped "
          f"x{totals['trl'] / totals['chipo-grouped']:.2f}, "
          f"chipo-buckets x{totals['trl'] / totals['chipo-buckets']:.2f}")


if __name__ == "__main__":
    main()
