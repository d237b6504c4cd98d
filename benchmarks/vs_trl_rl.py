"""``chipo rl`` (RLOO, regularizer=kl, estimator k1) vs TRL 1.16's ``RLOOTrainer``, fp32 on CPU.
Not part of the test suite.

    python benchmarks/vs_trl_rl.py [--repeats N] [--steps N] [--k K] [--quick] [--threads N] [--workdir DIR]
                                   [--out FILE]

Identical for both (assets from ``vs_trl_online.build_assets``): the tiny Llama policy (pi_ref = its initial
copy), the WordLevel tokenizer, the prompts, the reward (one saved ``LlamaForSequenceClassification``), k samples
per prompt at temperature 1 up to ``max_new_tokens``, 8 prompts per step (TRL: ``per_device_train_batch_size`` =
8 k completions, ``num_generations`` = k, one optimizer step per generation batch), steps, beta 0.05 with the
sequence-level k1 KL penalty in the reward (TRL's RLOO does exactly that), leave-one-out baseline, no advantage
normalisation, AdamW (constant learning rate, no weight decay, grad-norm clip 1.0), fp32 (TRL's bf16 and gradient
checkpointing off), no checkpoints, one process with ``--threads`` torch threads.

Throughput: samples/s = k x 8 x steps / time, for the whole process (parent's wall clock around the subprocess)
and for the training loop alone; runs alternate TRL, chipo, ... in one invocation; medians, with the load average.

No loss check: at an on-policy step TRL's RLOO loss is -mean(ratio x advantage) with ratio = 1, and leave-one-out
advantages sum to zero within each prompt's group, so its value is 0 whatever the batch; chipo's loss
-advantage x log pi has the same gradient but a different value. Equal losses would not say anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vs_trl_online import CONFIG, QUICK, build_assets, compare, serve_worker  # noqa: E402

RL = {"k": 4, "beta": 0.05}


def worker_chipo(spec: dict, result: dict) -> None:
    import chipo.train.rl as rl
    from chipo.train.rl_config import RLConfig

    original = rl.RLTrainer.train

    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        out = original(self, *args, **kwargs)
        result["train_s"] = time.perf_counter() - t
        return out

    rl.RLTrainer.train = timed
    d, c = Path(spec["dir"]), spec["cfg"]
    rl.run_rl(RLConfig(
        policy=str(d / "model"), reward=str(d / "rm"), prompts=str(d / "prompts.jsonl"), regularizer="kl",
        estimator="k1", beta=c["beta_rl"], k=c["k"], max_new_tokens=c["max_new_tokens"],
        prompts_per_step=c["prompts_per_step"], max_steps=c["steps"], learning_rate=c["learning_rate"],
        lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, seed=c["seed"],
        logging_steps=c["steps"], save_strategy="no", disable_tqdm=True, report_to="none", output_dir=spec["out"],
        overwrite_output_dir=True))


def worker_trl(spec: dict, result: dict) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    d, c = Path(spec["dir"]), spec["cfg"]
    tokenizer = AutoTokenizer.from_pretrained(d / "model")
    prompts = [json.loads(line)["prompt"] for line in open(d / "prompts.jsonl")]
    args = RLOOConfig(
        output_dir=spec["out"], per_device_train_batch_size=c["prompts_per_step"] * c["k"], num_generations=c["k"],
        max_completion_length=c["max_new_tokens"], temperature=1.0, beta=c["beta_rl"], num_iterations=1,
        normalize_advantages=False, max_steps=c["steps"], learning_rate=c["learning_rate"],
        lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, seed=c["seed"],
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=c["steps"], disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False)
    trainer = RLOOTrainer(model=AutoModelForCausalLM.from_pretrained(d / "model"),
                          reward_funcs=AutoModelForSequenceClassification.from_pretrained(d / "rm", num_labels=1),
                          args=args, train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=tokenizer, reward_processing_classes=tokenizer)
    t = time.perf_counter()
    trainer.train()
    result["train_s"] = time.perf_counter() - t
    trainer.save_model(spec["out"])  # chipo saves its final policy too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--k", type=int, default=RL["k"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (both trainers)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        serve_worker(a.worker, {"chipo": worker_chipo, "trl": worker_trl})
        return
    cfg = {**CONFIG, **(QUICK if a.quick else {}), "k": a.k, "beta_rl": RL["beta"]}
    if a.steps:
        cfg["steps"] = a.steps
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="vs_trl_rl-"))
    sys.path.insert(0, str(HERE.parent / "src"))
    if not (workdir / "assets" / "rm").is_dir():
        build_assets(cfg, workdir / "assets")
    spec = {"dir": str(workdir / "assets"), "cfg": cfg, "threads": a.threads}
    load = {"before": os.getloadavg()}
    summary = compare(spec, workdir, a.repeats, cfg["k"] * cfg["prompts_per_step"] * cfg["steps"], cfg, load,
                      script=__file__)
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
