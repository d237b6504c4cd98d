"""chipo online (loss=dpo) vs TRL 1.16's OnlineDPOTrainer (``trl.experimental.online_dpo``), fp32 on CPU.
Not part of the test suite.

    python benchmarks/vs_trl_online.py [--repeats N] [--steps N] [--quick] [--workdir DIR] [--out FILE]

Identical for both: the tiny Llama policy (built once, saved, loaded by every run; pi_ref = its initial copy), the
WordLevel tokenizer built in code (prompts start with the BOS word, so TRL's ``add_special_tokens=False`` and
chipo's prompt encoding give the same ids), the prompts, the judge (one saved ``LlamaForSequenceClassification``
reward model; both label a pair by the higher score: chipo ``label=argmax``, as TRL does), 2 responses per prompt
sampled at temperature 1 up to ``max_new_tokens``, prompts per step, steps, DPO loss with beta 0.1, AdamW,
learning rate, no checkpoints, fp32 (TRL's bf16 and gradient checkpointing off: its fastest configuration
here), one process with ``--threads`` torch threads (default 1). The model is
untrained, so responses rarely stop early and both trainers generate the full ``max_new_tokens``
per response: equal work per step.

Throughput: samples/s = 2 x prompts per step x steps / time, for the whole process (the parent's wall clock
around the subprocess: interpreter start, imports, model loading, training, saving) and for the training loop
alone. Runs alternate TRL, chipo, TRL, chipo ... in one invocation; medians are reported with the load average
before and after, because the machine is shared.

Loss check (``--worker check``): one process builds both trainers on the same weights and feeds each, through
its own training-step code, the same fixed batch (prompts of equal length, fixed responses ending in EOS,
labelled by a reward function of the text that both call): TRL's ``training_step`` with its generation replaced
by the fixed batch, chipo's ``OnlineTrainer.train_step`` with its sampler replaced. The two DPO losses and the
mean chosen/rejected log-probs must agree to 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
CONFIG = {"vocab": 512, "hidden": 128, "layers": 2, "heads": 4, "intermediate": 256, "prompts": 64,
          "prompt_words": (6, 20), "max_new_tokens": 24, "prompts_per_step": 8, "steps": 16, "beta": 0.1,
          "learning_rate": 1e-5, "seed": 0}
QUICK = {"steps": 4, "max_new_tokens": 12}


def build_assets(cfg: dict, directory: Path) -> None:
    """Tokenizer + policy in ``model/``, reward model in ``rm/``, prompts in ``prompts.jsonl``."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from chipo.toy import build_tiny_llama

    directory.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(cfg["vocab"] - len(SPECIAL))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + words)}, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                        eos_token="<|eos|>", unk_token="<|unk|>", model_max_length=1024)
    model = build_tiny_llama(len(tokenizer), hidden_size=cfg["hidden"], num_layers=cfg["layers"],
                             num_heads=cfg["heads"], intermediate_size=cfg["intermediate"],
                             max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, seed=0)
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    rm.save_pretrained(directory / "rm")
    tokenizer.save_pretrained(directory / "rm")
    rng = np.random.default_rng(0)
    lo, hi = cfg["prompt_words"]
    rows = [{"prompt": "<|bos|> " + " ".join(rng.choice(words, int(rng.integers(lo, hi + 1))))}
            for _ in range(cfg["prompts"])]
    (directory / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------------ workers


def worker_chipo(spec: dict, result: dict) -> None:
    import chipo.train.online as online

    original = online.OnlineTrainer.train

    def timed(self):
        t = time.perf_counter()
        original(self)
        result["train_s"] = time.perf_counter() - t

    online.OnlineTrainer.train = timed
    d, c = Path(spec["dir"]), spec["cfg"]
    online.run_online(online.OnlineConfig(
        policy=str(d / "model"), prompts=str(d / "prompts.jsonl"), judge=str(d / "rm"), label="argmax", loss="dpo",
        beta=c["beta"], max_new_tokens=c["max_new_tokens"], prompts_per_step=c["prompts_per_step"],
        max_steps=c["steps"], learning_rate=c["learning_rate"], seed=c["seed"], save_steps=0,
        logging_steps=c["steps"], disable_tqdm=True, output_dir=spec["out"], overwrite_output_dir=True))


def perturbed(d: Path):
    """The policy with seeded Gaussian noise (std 0.02) on every weight: pi != pi_ref, so the check's losses are
    not all log 2."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d / "model")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def trl_trainer(d: Path, c: dict, out: str, steps: int, reward=None, model=None, ref_model=None):
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(d / "model")
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(d / "model")
    if reward is None:
        reward = AutoModelForSequenceClassification.from_pretrained(d / "rm", num_labels=1)
    prompts = [json.loads(line)["prompt"] for line in open(d / "prompts.jsonl")]
    args = OnlineDPOConfig(
        output_dir=out, per_device_train_batch_size=c["prompts_per_step"], max_steps=steps, beta=c["beta"],
        max_new_tokens=c["max_new_tokens"], temperature=1.0, max_length=1024, learning_rate=c["learning_rate"],
        lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, seed=c["seed"],
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=steps,
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False)
    return OnlineDPOTrainer(model=model, ref_model=ref_model, reward_funcs=reward, args=args,
                            train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
                            processing_class=tokenizer, reward_processing_classes=tokenizer)


def worker_trl(spec: dict, result: dict) -> None:
    trainer = trl_trainer(Path(spec["dir"]), spec["cfg"], spec["out"], spec["cfg"]["steps"])
    t = time.perf_counter()
    trainer.train()
    result["train_s"] = time.perf_counter() - t
    trainer.save_model(spec["out"])  # chipo saves its final policy too


def check_reward(prompts, completions, **_):
    """A deterministic reward of the text (distinct for distinct texts): both trainers call it."""
    return [sum((i + 1) * ord(ch) for i, ch in enumerate(c)) % 10007 / 100.0 for c in completions]


def worker_check(spec: dict, result: dict) -> None:
    """Both trainers' step code on one fixed batch (module docstring)."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import chipo.train.online as online

    d, c = Path(spec["dir"]), spec["cfg"]
    tokenizer = AutoTokenizer.from_pretrained(d / "model")
    n, words = c["prompts_per_step"], len(tokenizer) - len(SPECIAL)
    g = torch.Generator().manual_seed(5)
    prompt_ids = [[tokenizer.bos_token_id] + (len(SPECIAL) + torch.randint(words, (9,), generator=g)).tolist()
                  for _ in range(n)]  # equal length: no padding inside the prompt block
    responses = [[(len(SPECIAL) + torch.randint(words, (int(torch.randint(3, 12, (1,), generator=g)),),
                                                 generator=g)).tolist() + [tokenizer.eos_token_id]
                  for _ in range(n)] for _ in range(2)]  # responses[s][i]: sample s of prompt i
    texts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids]

    # chipo: OnlineTrainer.train_step with the sampler returning the fixed responses of the prompts it is given
    config = online.OnlineConfig(policy=str(d / "model"), prompts="unused", judge="vs_trl_online:check_reward",
                                 label="argmax", loss="dpo", beta=c["beta"], prompts_per_step=n,
                                 learning_rate=c["learning_rate"], output_dir=spec["out"], max_new_tokens=16)
    served = [0] * n  # how many responses of each prompt the trainer has drawn: its first is sample 0, then 1

    def fixed_sample(policy, ref, p_ids, keys, **_):
        out = []
        for p in p_ids:
            i = prompt_ids.index(list(p))
            out.append((responses[served[i]][i], True))
            served[i] += 1
        return out

    online.sample = fixed_sample
    trainer = online.OnlineTrainer(config, Accelerator(cpu=True), perturbed(d),
                                   AutoModelForCausalLM.from_pretrained(d / "model"), tokenizer,
                                   online.PreferenceOracle(config), prompt_ids, texts, Path(spec["out"]))
    record = trainer.train_step(0)

    # TRL: training_step with _generate returning the same batch (first half: sample 0, second half: sample 1)
    trl = trl_trainer(d, c, spec["out"] + "-trl", 1, reward=check_reward, model=perturbed(d),
                      ref_model=AutoModelForCausalLM.from_pretrained(d / "model"))
    width = max(len(r) for s in responses for r in s)
    comp = torch.full((2 * n, width), tokenizer.pad_token_id)
    mask = torch.zeros((2 * n, width), dtype=torch.long)
    for s in range(2):
        for i, r in enumerate(responses[s]):
            comp[s * n + i, :len(r)], mask[s * n + i, :len(r)] = torch.tensor(r), 1
    p = torch.tensor(prompt_ids).repeat(2, 1)
    trl._generate = lambda model, prompts, images=None: (p, torch.ones_like(p), comp, mask, None)
    loss = float(trl.training_step(trl.model, {"prompt": texts}))
    ours = {"loss": record["loss"], "logps/chosen": record["logps/chosen"], "logps/rejected": record["logps/rejected"]}
    theirs = {"loss": loss, "logps/chosen": trl.stats["logps/chosen"][-1],
              "logps/rejected": trl.stats["logps/rejected"][-1]}
    result.update({"chipo": ours, "trl": theirs, "max_abs_diff": max(abs(ours[k] - theirs[k]) for k in ours),
                   "labels_used": record["labels"], "pairs_kept": record["labels/step"]})


# ------------------------------------------------------------------------------------------------ parent


def run_worker(kind: str, spec: dict, workdir: Path, script: str = __file__) -> dict:
    """``script --worker KIND SPEC RESULT`` in a fresh interpreter; its result plus the whole process's wall time."""
    spec_path = workdir / f"spec-{kind}.json"
    result_path = workdir / f"result-{kind}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE),
                                                        os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--worker", kind, str(spec_path), str(result_path)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(result_path.read_text()), "wall_s": wall}


def serve_worker(worker: list[str], workers: dict) -> None:
    """The ``--worker KIND SPEC RESULT`` subprocess: run ``workers[KIND]`` on the spec, write its result JSON."""
    kind, spec_path, result_path = worker
    spec, result = json.loads(Path(spec_path).read_text()), {}
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["cfg"]["seed"])
    workers[kind](spec, result)
    Path(result_path).write_text(json.dumps(result))


def compare(spec: dict, workdir: Path, repeats: int, samples: int, cfg: dict, load: dict, script: str | None = None,
            **extra) -> dict:
    """Alternated TRL / chipo whole-process runs; median samples/s of the process and of the training loop."""
    runs = {"trl": [], "chipo": []}
    for r in range(repeats):
        for kind in ("trl", "chipo"):
            res = run_worker(kind, {**spec, "out": str(workdir / f"{kind}-{r}")}, workdir,
                             **({"script": script} if script else {}))
            res["samples_per_s"], res["loop_samples_per_s"] = samples / res["wall_s"], samples / res["train_s"]
            runs[kind].append(res)
            print(f"  {kind:5s} run {r}: whole process {res['wall_s']:.1f} s ({res['samples_per_s']:.1f} samples/s), "
                  f"training loop {res['train_s']:.1f} s ({res['loop_samples_per_s']:.1f} samples/s)", flush=True)
    load["after"] = os.getloadavg()
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("samples_per_s", "loop_samples_per_s", "wall_s")}
           for k, v in runs.items()}
    summary = {"config": cfg, "samples_per_run": samples, **extra, "runs": runs, "median": med,
               "speedup_whole": med["chipo"]["samples_per_s"] / med["trl"]["samples_per_s"],
               "speedup_loop": med["chipo"]["loop_samples_per_s"] / med["trl"]["loop_samples_per_s"],
               "loadavg": load, "cpus": os.cpu_count()}
    print(f"median samples/s, whole process: chipo {med['chipo']['samples_per_s']:.1f} vs TRL "
          f"{med['trl']['samples_per_s']:.1f} (x{summary['speedup_whole']:.2f}); training loop: chipo "
          f"{med['chipo']['loop_samples_per_s']:.1f} vs TRL {med['trl']['loop_samples_per_s']:.1f} "
          f"(x{summary['speedup_loop']:.2f}); load average {load['before']} -> {load['after']} on {os.cpu_count()} "
          "CPUs")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (both trainers)")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        serve_worker(a.worker, {"chipo": worker_chipo, "trl": worker_trl, "check": worker_check})
        return
    cfg = {**CONFIG, **(QUICK if a.quick else {})}
    if a.steps:
        cfg["steps"] = a.steps
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="vs_trl_online-"))
    sys.path.insert(0, str(HERE.parent / "src"))
    build_assets(cfg, workdir / "assets")
    spec = {"dir": str(workdir / "assets"), "cfg": cfg, "threads": a.threads}
    load = {"before": os.getloadavg()}
    check = run_worker("check", {**spec, "out": str(workdir / "check")}, workdir)
    print(f"loss check on a fixed batch: chipo {check['chipo']}\n                             TRL   {check['trl']}"
          f"\n  max |diff| = {check['max_abs_diff']:.2e}")
    summary = compare(spec, workdir, a.repeats, 2 * cfg["prompts_per_step"] * cfg["steps"], cfg, load,
                      check=check)
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
