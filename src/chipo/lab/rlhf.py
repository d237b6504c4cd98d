"""``chipo demo --full``: standard RLHF (reward model, then RL) with ``kl`` and ``chi2mix``, best-of-n and
inference-time pessimism, on the demo's world and preference process, in the Gao et al. (2023) view.

Protocol (fixed before looking at results; stated in the report):

* reward models (``chipo.train.reward.run_reward_training``, backbone = pi_ref, fresh score head) are trained on
  preference pairs drawn by *the same* Bradley-Terry process as the DPO/chiPO data (two pi_ref samples per pair,
  labels sigmoid(scale (r*(y1) - r*(y2)))). Two RMs: one on exactly the pairs DPO/chiPO saw (seed 0), and one on
  ``rm_pairs_per_prompt`` fresh pairs per training prompt (more data). RL uses the larger one; both are reported
  with their held-out accuracy, and the report says whether the extra data made the reward model more accurate.
  The gold reward is never changed or tuned.
* RL: ``chipo.train.rl_run.run_rl`` (RLOO), once with ``regularizer=kl`` (k1 estimator) and once with ``chi2mix``,
  identical beta, steps, learning rate, k, prompts and seeds. Every ``eval_every`` steps the trainer logs the
  proxy reward and Monte-Carlo KL (k1, k3) and chi2 on held-out prompts, and our ``eval_callback`` adds the exact
  gold reward (and partition KL / chi2 / malformed mass) over the world's enumerable response space.
* best-of-n and pessimism: one pool of pi_ref samples per held-out prompt, scored by the proxy RM and the gold.
  For n in ``ns``: (a) ``select("bon" | "pessimism")`` on independent replicates of the pool (what a user would
  get), and (b) the output law of each method over the pool's empirical measure (``best_of_n_distribution``,
  ``pessimism_distribution`` with the population normaliser): both methods reweight pi_ref by a function of the
  proxy reward only, so KL and expected rewards of that law are consistent estimates. The analytic best-of-n KL
  log n - (n - 1)/n is recorded beside it.

Results go to ``<out>/rlhf/rlhf.json``, written after every finished part; a rerun skips finished parts. As an
experiment (``chipo.lab.experiments``, name ``rlhf``) it needs the offline one: its preference data and rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from chipo.data.prompts import load_prompts
from chipo.generation import SamplingSettings
from chipo.io import write_json, write_jsonl
from chipo.lab.experiments import Context, Experiment
from chipo.lab.generate import generate_preferences
from chipo.lab.offline import data_dir
from chipo.lab.protocol import WorldProcess
from chipo.rewards import load_scorer


@dataclass(frozen=True)
class RLHFSettings(WorldProcess):
    """Sizes of the RLHF comparison; ``quick()`` is the smoke-test version. Betas, Bradley-Terry scale, learning
    rate and response length are the demo's (``WorldProcess``): the RM's reward is in BT units like DPO's implicit
    reward."""

    rm_pairs_per_prompt: int = 32
    rm_epochs: float = 6.0
    rm_learning_rate: float = 1e-3
    rm_batch_size: int = 32
    steps: int = 300
    k: int = 4
    prompts_per_step: int = 16
    eval_every: int = 25
    eval_samples: int = 32
    max_eval_prompts: int | None = None
    ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    pessimism_betas: tuple[float, ...] = (0.05, 0.5)  # in the proxy's units
    replicates: int = 16  # independent selections per prompt for select(); pool = replicates * (2 max n + 1)
    seed: int = 0
    rl_seeds: int = 3  # RL runs per (regularizer, beta): seed, seed + 1, ...; the report tests chi2mix vs kl on them

    @staticmethod
    def quick() -> RLHFSettings:
        return RLHFSettings(rm_pairs_per_prompt=8, rm_epochs=1.0, steps=20, eval_every=10, eval_samples=8,
                            ns=(1, 2, 4, 8), replicates=4, max_eval_prompts=8, rl_seeds=2)


REGULARIZERS = ("kl", "chi2mix")


def _prompts(path: str, limit: int | None = None) -> list[str]:
    return load_prompts(path, max_rows=limit, text_only=True).prompts


def run_rlhf(world, out_dir: str | Path, settings: RLHFSettings | None = None, *, demo_pairs: str | None = None,
             heldout_pairs: str | None = None, echo=print, overwrite: bool = False) -> Path:
    """Run (or resume) every part; returns the path of ``rlhf.json``. ``out_dir`` is opened under the
    experiment-directory protocol (``chipo.train.experiment_dir.open_experiment``: one run at a time, the settings
    and world checked against ``experiment.json`` -- or the ``rlhf.json`` of a directory made before it -- and
    refused when they differ unless ``overwrite``), with or without ``chipo demo``."""
    from chipo.train.experiment_dir import open_experiment

    settings = settings or RLHFSettings()
    out = Path(out_dir)
    key = {"settings": asdict(settings), "world": str(world.root)}
    with open_experiment(out, key, overwrite=overwrite, what="RLHF experiment",
                         legacy_key=lambda d: _recorded_key(d, world), label="out") as exp:
        path = _run(world, out, settings, demo_pairs, heldout_pairs, echo)
        exp.finish({"results": path.name})
    return path


def _recorded_key(out: Path, world) -> dict | None:
    """The key of a directory made before the protocol marker: ``rlhf.json``'s settings (it did not record its
    world: taken to be this one, as that code assumed)."""
    path = out / "rlhf.json"
    saved = json.loads(path.read_text()).get("settings") if path.is_file() else None
    return None if saved is None else {"settings": saved, "world": str(world.root)}


def _run(world, out: Path, settings: RLHFSettings, demo_pairs: str | None, heldout_pairs: str | None, echo) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = out / "rlhf.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["settings"] = asdict(settings)
    results.setdefault("timing", {})

    def save() -> None:
        write_json(path, results)

    tokenizer = AutoTokenizer.from_pretrained(world.pi_ref)
    ref = AutoModelForCausalLM.from_pretrained(world.pi_ref).eval()
    gold = world.scorer()
    train_prompts = _prompts(world.train_prompts_path)
    eval_prompts = _prompts(world.eval_prompts_path, settings.max_eval_prompts)

    if "reward_models" not in results:
        t0 = time.perf_counter()
        results["reward_models"] = reward_models(world, out, settings, (ref, tokenizer, gold), train_prompts,
                                                 eval_prompts, demo_pairs, heldout_pairs, echo)
        results["timing"]["reward_models_s"] = time.perf_counter() - t0
        save()
    rm_path = results["reward_models"]["rm"]["path"]

    results.setdefault("rl", {})
    for beta in settings.betas:
        for offset in range(settings.rl_seeds):
            for reg in REGULARIZERS:
                # The first seed keeps the plain key (its curve is the one drawn); the others add a suffix.
                key = f"{reg}_beta{beta:g}" + (f"_seed{settings.seed + offset}" if offset else "")
                if not results["rl"].get(key, {}).get("done"):
                    results["rl"][key] = _rl_run(world, rm_path, out / f"rl_{key}", reg, beta, settings,
                                                 eval_prompts, (ref, tokenizer, gold), settings.seed + offset, echo)
                    save()

    # best-of-n and inference-time pessimism on one pool of pi_ref samples
    if "inference" not in results:
        t0 = time.perf_counter()
        results["inference"] = inference_curves(ref, tokenizer, eval_prompts, gold, rm_path, settings)
        results["timing"]["inference_s"] = time.perf_counter() - t0
        save()
        echo(f"      best-of-n / pessimism curves ({time.perf_counter() - t0:.0f} s)")
    return path


def reward_models(world, out: Path, settings: RLHFSettings, models, train_prompts: list[str],
                  eval_prompts: list[str], demo_pairs: str | None, heldout_pairs: str | None, echo) -> dict:
    """The two reward models (module docstring), each with its held-out accuracy. ``models``: (pi_ref, its
    tokenizer, the gold scorer). Held-out pairs: ``heldout_pairs``, else 8 fresh pairs per held-out prompt."""
    ref, tokenizer, gold = models

    def pairs(prompts: list[str], per_prompt: int, seed: int, path: Path) -> int:
        rows, stats = generate_preferences(ref, tokenizer, prompts, gold, pairs_per_prompt=per_prompt,
                                           scale=settings.scale, progress=False,
                                           settings=SamplingSettings(max_new_tokens=settings.max_new_tokens,
                                                                     seed=seed + settings.seed))
        write_jsonl(path, rows)
        return stats.pairs

    sources = {"rm": (str(out / "data" / "rm_train.jsonl"),
                      pairs(train_prompts, settings.rm_pairs_per_prompt, 5000, out / "data" / "rm_train.jsonl"))}
    if heldout_pairs is None:
        pairs(eval_prompts, 8, 6000, out / "data" / "heldout.jsonl")
        heldout_pairs = str(out / "data" / "heldout.jsonl")
    held = [json.loads(line) for line in open(heldout_pairs) if line.strip()]
    if demo_pairs:
        sources["rm_demo_pairs"] = (demo_pairs, sum(1 for line in open(demo_pairs) if line.strip()))
    result = {}
    for name, (data, n_pairs) in sources.items():
        rm_dir = _train_reward_model(world, data, out / name, settings)
        m = result[name] = {"path": str(rm_dir), "pairs": n_pairs, "data": data, **reward_model_accuracy(rm_dir, held)}
        echo(f"      reward model {name}: {m['pairs']} pairs, held-out accuracy {100 * m['acc_labels']:.0f}% vs "
             f"labels, {100 * m['acc_gold']:.0f}% vs the gold ordering")
    return result


def _rl_run(world, rm_path: str, out: Path, reg: str, beta: float, settings: RLHFSettings, eval_prompts, models,
            seed: int, echo) -> dict:
    """One RL run's record: its evaluation curve, wall seconds, regularizer, beta and seed."""
    ref, tokenizer, gold = models
    t0 = time.perf_counter()
    curve = run_rl_curve(world, rm_path, out, reg, beta, settings, eval_prompts, gold, ref, tokenizer, seed=seed)
    last = curve[-1]
    echo(f"      RL {reg} beta {beta:g} seed {seed}: step {last['step']}, proxy {last['proxy']:.2f}, gold "
         f"{last['gold']:.3f}, KL {last['kl_k3']:.2f} ({time.perf_counter() - t0:.0f} s)")
    return {"done": True, "curve": curve, "seconds": time.perf_counter() - t0, "regularizer": reg, "beta": beta,
            "seed": seed}


def _train_reward_model(world, data: str, out: Path, settings: RLHFSettings) -> Path:
    from chipo.train.reward import run_reward_training
    from chipo.train.reward_config import RewardConfig

    if out.exists():
        shutil.rmtree(out)
    config = RewardConfig(model=world.pi_ref, dataset=data, output_dir=str(out), overwrite_output_dir=True,
                          drop_ties=True,  # pairs sampled from pi_ref can repeat a response: no preference there
                          num_train_epochs=settings.rm_epochs, per_device_train_batch_size=settings.rm_batch_size,
                          learning_rate=settings.rm_learning_rate, lr_scheduler_type="constant", optim="adamw_torch",
                          save_strategy="no", logging_steps=1000, disable_tqdm=True, max_length=32,
                          seed=settings.seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log, contextlib.redirect_stdout(log):
        return run_reward_training(config)


def reward_model_accuracy(rm_dir: str | Path, pairs: list[dict]) -> dict:
    """Held-out accuracy of a reward model: against the BT labels and against the gold ordering (ties skipped)."""
    rm = load_scorer(str(rm_dir))
    chosen = rm.score([r["prompt"] for r in pairs], [r["chosen"] for r in pairs])
    rejected = rm.score([r["prompt"] for r in pairs], [r["rejected"] for r in pairs])
    diff = chosen - rejected
    acc = float(np.mean((diff > 0) + 0.5 * (diff == 0)))
    g = np.array([r["gold_chosen"] - r["gold_rejected"] for r in pairs])
    strict = g != 0
    acc_gold = float(np.mean(((diff * np.sign(g)) > 0)[strict] + 0.5 * (diff[strict] == 0))) if strict.any() \
        else math.nan
    return {"acc_labels": acc, "acc_gold": acc_gold, "heldout_pairs": len(pairs)}


def run_rl_curve(world, rm_path: str, out: Path, regularizer: str, beta: float, settings: RLHFSettings,
                 eval_prompts: list[str], gold, ref, tokenizer, seed: int | None = None) -> list[dict]:
    """One ``run_rl`` run; returns its evaluation curve (step 0 = pi_ref)."""
    from chipo.lab.evaluate import Baseline, ExactSpace, exact_metrics
    from chipo.train.rl_config import RLConfig
    from chipo.train.rl_run import run_rl

    if out.exists():  # an unfinished run: start it again (runs take about a minute)
        shutil.rmtree(out)
    baseline = Baseline(eval_prompts, [None] * len(eval_prompts), np.full(len(eval_prompts), np.nan), None, None,
                        exact=ExactSpace(*gold.exact_partition(ref, tokenizer, eval_prompts)))

    def callback(policy, step):
        was_training = policy.training
        policy.eval()
        m = exact_metrics(gold.exact_partition(policy, tokenizer, eval_prompts)[0], baseline)
        policy.train(was_training)
        return {"gold_exact": m["gold"], "kl_partition": m["kl"], "chi2_partition": m["chi2"],
                "mass_malformed": m["mass_malformed"], "win_rate_vs_ref": m["win_rate_vs_ref"]}

    config = RLConfig(policy=world.pi_ref, reward=rm_path, prompts=world.train_prompts_path,
                      eval_prompts=world.eval_prompts_path, max_eval_prompts=len(eval_prompts),
                      output_dir=str(out), overwrite_output_dir=True, regularizer=regularizer, estimator="k1",
                      beta=beta, k=settings.k, max_new_tokens=settings.max_new_tokens,
                      max_steps=settings.steps, prompts_per_step=settings.prompts_per_step,
                      learning_rate=settings.learning_rate, seed=settings.seed if seed is None else seed,
                      logging_steps=settings.eval_every,
                      eval_steps=settings.eval_every, eval_samples=settings.eval_samples, save_strategy="no",
                      disable_tqdm=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "w") as log, contextlib.redirect_stdout(log):
        run_rl(config, eval_callback=callback)
    curve = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "eval_reward" not in r:
            continue
        curve.append({"step": r["step"], "proxy": r["eval_reward"], "gold": r["eval_gold_exact"],
                      "kl_k1": r["eval_kl_k1"], "kl_k3": r["eval_kl_k3"], "chi2": r["eval_chi2"],
                      "kl_partition": r["eval_kl_partition"], "chi2_partition": r["eval_chi2_partition"],
                      "mass_malformed": r["eval_mass_malformed"], "win_rate_vs_ref": r["eval_win_rate_vs_ref"],
                      "train_reward": r.get("reward"), "length": r.get("eval_response_length")})
    return curve


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    keep = p > 0
    return float((p[keep] * np.log(p[keep] / q[keep])).sum())


def inference_curves(ref, tokenizer, prompts: list[str], gold, rm_path: str, settings: RLHFSettings) -> dict:
    """Best-of-n and pessimism scaling curves from one scored pool of pi_ref samples (module docstring)."""
    from chipo.generation import sample_responses
    from chipo.inference import best_of_n_distribution, best_of_n_kl_bound, pessimism_distribution, select
    from chipo.lab.evaluate import win_probability
    from chipo.stats import mean_se

    width = 2 * max(settings.ns) + 1
    m = settings.replicates * width
    samples = sample_responses(ref, tokenizer, prompts, m, SamplingSettings(max_new_tokens=settings.max_new_tokens,
                                                                            seed=7000 + settings.seed),
                               progress=False)
    texts = samples.prompt_texts()
    proxy = load_scorer(rm_path).score(texts, samples.texts).reshape(len(prompts), m)
    true = np.asarray(gold.score(texts, samples.texts), dtype=float).reshape(len(prompts), m)
    r_max = float(proxy.max())  # the proxy's upper bound, estimated by the largest reward in the pool
    rep_proxy, rep_gold = proxy.reshape(-1, width), true.reshape(-1, width)
    q = np.full(m, 1.0 / m)
    out = {"pool_per_prompt": m, "prompts": len(prompts), "r_max": r_max,
           "pi_ref": {"gold": float(true.mean()), "proxy": float(proxy.mean())},
           "proxy_gold_correlation": _correlation(proxy.ravel(), true.ravel()),
           "methods": {}}

    def point(n, picks, laws):
        rows = np.arange(len(rep_proxy))
        g, g_se = mean_se(rep_gold[rows, picks])
        pr, pr_se = mean_se(rep_proxy[rows, picks])
        kls = [_kl(law, q) for law in laws]
        return {"n": n, "gold_selected": g, "gold_selected_se": g_se, "proxy_selected": pr,
                "proxy_selected_se": pr_se, "kl": float(np.mean(kls)),
                "gold": float(np.mean([law @ true[i] for i, law in enumerate(laws)])),
                "proxy": float(np.mean([law @ proxy[i] for i, law in enumerate(laws)])),
                # the same law against pi_ref's pool (ties 1/2), and its mass on text outside the language (gold 0)
                "win_rate_vs_ref": float(np.mean([win_probability(law, q, true[i]) for i, law in enumerate(laws)])),
                "mass_malformed": float(np.mean([law @ (true[i] == 0) for i, law in enumerate(laws)]))}

    bon = []
    for n in settings.ns:
        picks, _ = select("bon", rep_proxy, n)
        laws = [best_of_n_distribution(q, proxy[i], n) for i in range(len(prompts))]
        bon.append({**point(n, picks, laws), "kl_analytic": best_of_n_kl_bound(n)})
    out["methods"]["bon"] = bon
    for beta in settings.pessimism_betas:
        curve = []
        for n in settings.ns:
            picks, _ = select("pessimism", rep_proxy, n, beta=beta, r_max=r_max,
                              rng=np.random.default_rng(settings.seed + n))
            laws = [pessimism_distribution(q, proxy[i], n, beta, r_max) for i in range(len(prompts))]
            curve.append(point(n, picks, laws))
        out["methods"][f"pessimism_beta{beta:g}"] = curve
    return out


# ------------------------------------------------------------------------------------------------ the experiment


def run_experiment(context: Context, settings: RLHFSettings, out_dir: Path) -> None:
    """``run_rlhf`` on the context's world, its reward model ``rm_demo_pairs`` on the offline experiment's seed-0
    pairs and its held-out pairs the offline experiment's."""
    data = data_dir(context)
    run_rlhf(context.world(), out_dir, settings, echo=context.echo, demo_pairs=str(data / "train_seed0.jsonl"),
             heldout_pairs=str(data / "heldout.jsonl"), overwrite=context.overwrite)


def render(out_dir: Path, context: Context) -> str:
    """The report section from ``rlhf.json`` and the offline sweep's rows (drawn on the same axes); its figure goes
    into the report directory."""
    from chipo.lab.report_rlhf import rlhf_section
    from chipo.lab.runs import read_results

    results = json.loads((out_dir / "rlhf.json").read_text())
    return rlhf_section(context.report_dir, results, read_results(context.dir("offline") / "results.jsonl"))


EXPERIMENT = Experiment(
    name="rlhf", title="reward model, RL with kl and chi2mix, best-of-n and pessimism on the same world and data",
    settings=RLHFSettings, run=run_experiment, render=render, needs=("offline",),
    owns_directory=True)  # run_rlhf applies the directory protocol: it gets it without the runner too
