"""The cells of the method table (``chipo.lab.methods``): the shared data and reward models, and one run of any
method -- trained through the lab's own entry points (``chipo.lab.sweep.CellRunner``, ``chipo.lab.online``,
``chipo.lab.rlhf``) and evaluated by one function (``chipo.lab.evaluate.evaluate_policy``) -- with its CPU time."""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from pathlib import Path

from chipo.lab.methods_protocol import FAMILIES, OFFLINE, RLHF, MethodTableSettings
from chipo.lab.protocol import DemoSettings


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads): a cell's own cost, its worker's other cells
    excluded (``chipo.lab.experiments.cpu_seconds`` adds the finished child processes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _preference_data(world, out: Path, settings: MethodTableSettings) -> int:
    """The demo's data for every seed (same process and seeds: ``chipo.lab.offline``); returns the labels per seed."""
    from chipo.lab.generate import seed_datasets

    _, train, _ = seed_datasets(world, out / "data", seeds=settings.seeds, pairs_per_prompt=settings.pairs_per_prompt,
                                heldout_pairs_per_prompt=DemoSettings.heldout_pairs_per_prompt, scale=settings.scale,
                                max_new_tokens=settings.max_new_tokens)
    return settings.pairs_per_prompt * len(train)


def _reward_model(world, out: Path, settings: MethodTableSettings, seed: int) -> float:
    """The seed's reward model on exactly its offline pairs (``chipo.lab.rlhf``); returns its training CPU time."""
    from chipo.io import write_json
    from chipo.lab.rlhf import _train_reward_model

    done = out / "rm" / f"seed{seed}.json"
    if done.is_file():
        return json.loads(done.read_text())["train_cpu_s"]
    cpu = cpu_seconds()
    _train_reward_model(world, str(out / "data" / f"train_seed{seed}.jsonl"), out / "rm" / f"seed{seed}",
                        settings.rlhf_settings(seed))
    cpu = cpu_seconds() - cpu
    write_json(done, {"train_cpu_s": cpu})
    return cpu


class Cells:
    """Holds pi_ref, the gold scorer and the shared evaluation baseline; trains and evaluates one cell."""

    def __init__(self, world, out: str, settings: MethodTableSettings, labels: int, rm_cpu: dict):
        from chipo.lab.sweep import CellRunner, SweepConfig

        self.world, self.out, self.settings, self.labels, self.rm_cpu = world, Path(out), settings, labels, rm_cpu
        s = settings
        offline = [m for m in s.methods if FAMILIES[m] == "offline"]
        self.sweep = SweepConfig(
            ref_model=world.pi_ref, train_prefs=str(self.out / "data" / "train_seed{seed}.jsonl"),
            eval_prompts=world.eval_prompts_path, heldout_prefs=str(self.out / "data" / "heldout.jsonl"),
            out_dir=str(self.out / "offline"), gold=world.gold_spec, betas=list(s.betas), seeds=list(range(s.seeds)),
            variants={m: {"loss": OFFLINE[m][0], **OFFLINE[m][1]} for m in offline}, epochs=s.epochs,
            learning_rate=s.learning_rate, batch_size=s.batch_size, r_max=s.scale * (1.0 - 0.0), max_length=32,
            num_samples=s.num_samples, max_new_tokens=s.max_new_tokens, max_eval_prompts=s.max_eval_prompts)
        self.train_cpu = 0.0
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # per-checkpoint INFO lines of chipo online
        # The offline cells' runner; its pi_ref, gold scorer and baseline serve every family's evaluation.
        self.runner = CellRunner(self.sweep, train_fn=self._timed_training, progress=False)

    def _timed_training(self, config) -> None:
        from chipo.lab.runs import save_at_epochs
        from chipo.train.run import run_training

        cpu = cpu_seconds()
        run_training(config, callbacks=[save_at_epochs(self.sweep.eval_epochs)])
        self.train_cpu += cpu_seconds() - cpu

    def run(self, method: str, beta: float | None, seed: int) -> dict:
        start, cpu = time.perf_counter(), cpu_seconds()
        self.train_cpu = 0.0
        family = FAMILIES[method]
        row = {"method": method, "family": family, "beta": beta, "seed": seed, "labels": self.labels,
               "settings": self.settings.family_settings(family)}
        row.update(getattr(self, f"_{family}")(method, beta, seed))
        row.setdefault("train_cpu_s", self.train_cpu)
        row["eval_cpu_s"] = cpu_seconds() - cpu - row["train_cpu_s"]
        if family in ("rlhf", "inference"):
            row["reward_model_cpu_s"] = self.rm_cpu[seed]
        row["wall_s"] = time.perf_counter() - start
        return row

    def evaluate(self, policy, seed: int, **loss) -> dict:
        from chipo.lab.evaluate import evaluate_policy

        r = self.runner
        return evaluate_policy(policy, r.ref, r.tokenizer, r.gold, r.baseline, settings=self.sweep.sampling(seed),
                               num_samples=self.sweep.num_samples, progress=False, **loss)

    def _offline(self, method, beta, seed) -> dict:
        from chipo.lab.runs import read_results
        from chipo.lab.sweep import epochs_done

        path = self.out / "offline" / "results.jsonl"
        self.runner.run(method, beta, seed, epochs_done(read_results(path), method, beta, seed))
        rows = [r for r in read_results(path) if r.get("method") == method and r.get("beta") == beta
                and r.get("seed") == seed]
        return {"points": [{"epoch": r["epoch"], **point(r)} for r in sorted(rows, key=lambda r: r["epoch"])]}

    def _online(self, method, beta, seed) -> dict:
        from transformers import AutoModelForCausalLM

        from chipo.lab.online import _train

        settings = self.settings.online_settings()
        run_dir = self.out / "runs" / f"{method}_beta{beta:g}_seed{seed}"
        budget = settings.eval_labels(self.labels // self.settings.pairs_per_prompt)[-1]  # whole steps
        cpu = cpu_seconds()
        _train(self.world, run_dir, method, beta, seed, settings, [budget])
        train_cpu = cpu_seconds() - cpu
        policy = AutoModelForCausalLM.from_pretrained(run_dir).eval()  # the final policy (run_online saves it)
        metrics = self.evaluate(policy, seed)
        _clean(run_dir)
        return {"points": [{"step": budget // settings.prompts_per_step, **point(metrics)}], "labels": budget,
                "train_cpu_s": train_cpu}

    def _rlhf(self, method, beta, seed) -> dict:
        from transformers import AutoModelForCausalLM

        from chipo.lab.rlhf import run_rl_curve

        r, settings = self.runner, self.settings.rlhf_settings(seed)
        run_dir = self.out / "runs" / f"{method}_beta{beta:g}_seed{seed}"
        cpu = cpu_seconds()
        curve = run_rl_curve(self.world, str(self.out / "rm" / f"seed{seed}"), run_dir, RLHF[method], beta, settings,
                             r.baseline.prompts, r.gold, r.ref, r.tokenizer, seed=seed)
        train_cpu = cpu_seconds() - cpu  # includes the curve's two cheap evaluations (steps 0 and last)
        metrics = self.evaluate(AutoModelForCausalLM.from_pretrained(run_dir).eval(), seed)
        _clean(run_dir)
        return {"points": [{"step": curve[-1]["step"], "proxy": curve[-1]["proxy"], **point(metrics)}],
                "train_cpu_s": train_cpu}

    def _inference(self, method, beta, seed) -> dict:
        from chipo.lab.rlhf import inference_curves

        r = self.runner
        settings = self.settings.rlhf_settings(seed, pessimism_betas=() if beta is None else (beta,))
        cpu = cpu_seconds()
        curves = inference_curves(r.ref, r.tokenizer, r.baseline.prompts, r.gold, str(self.out / "rm" / f"seed{seed}"),
                                  settings)
        p = curves["methods"]["bon" if method == "bon" else f"pessimism_beta{beta:g}"][0]
        return {"points": [{"n": p["n"], "gold": p["gold"], "win_rate_vs_ref": p["win_rate_vs_ref"],
                            "kl_partition": None, "kl_mc": p["kl"], "mass_out_of_language": p["mass_malformed"],
                            "gold_sampled": p["gold_selected"], "kl_analytic": p.get("kl_analytic")}],
                # selection needs no training: its cost is sampling and scoring the pool (counted as evaluation)
                "train_cpu_s": 0.0, "selection_cpu_s": cpu_seconds() - cpu}


def point(metrics: dict) -> dict:
    """The table's numbers from ``evaluate_policy``'s output (exact block + Monte-Carlo estimates)."""
    exact = metrics.get("exact") or {}
    return {"gold": exact.get("gold"), "win_rate_vs_ref": exact.get("win_rate_vs_ref"),
            "kl_partition": exact.get("kl"), "chi2_partition": exact.get("chi2"),
            "mass_out_of_language": exact.get("mass_malformed"), "kl_mc": metrics["kl_k1"],
            "kl_mc_se": metrics["kl_k1_se"], "kl_k3": metrics["kl_k3"], "chi2_mc": metrics["chi2_mc"],
            "gold_sampled": metrics["gold_mean"], "implicit_acc": metrics.get("implicit_acc"),
            "length": metrics.get("length_mean")}


def _clean(run_dir: Path) -> None:
    """Checkpoints are only for resuming a cut run; the final policy stays for inspection."""
    for ckpt in run_dir.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)


def reference_point(world, settings: MethodTableSettings) -> dict:
    """pi_ref's exact gold reward, win rate against itself (1/2) and mass outside the language, on the held-out
    prompts every method is evaluated on: the table's reference row."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chipo.data.prompts import load_prompts
    from chipo.lab.evaluate import Baseline, ExactSpace, exact_metrics

    tokenizer = AutoTokenizer.from_pretrained(world.pi_ref)
    ref = AutoModelForCausalLM.from_pretrained(world.pi_ref).eval()
    prompts = load_prompts(world.eval_prompts_path, max_rows=settings.max_eval_prompts, text_only=True).prompts
    space = ExactSpace(*world.scorer().exact_partition(ref, tokenizer, prompts))
    baseline = Baseline(prompts, [None] * len(prompts), np.full(len(prompts), np.nan), None, None, exact=space)
    return exact_metrics(space.ref_logps, baseline)

