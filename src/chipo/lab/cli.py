"""Command line of the lab: ``chipo demo`` and ``chipo lab {generate-prefs, evaluate, sweep, report}``.

``main(["demo", "--quick"])`` is what ``chipo demo --quick`` runs; ``main(["sweep", ...])`` is ``chipo lab sweep``.
Every subcommand has ``--help``. Errors in the user's input (paths, specs, settings) print one line and return 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _r_max(text: str):
    if text.lower() in ("none", "null", "default"):
        return None
    return float(text)


def _add_sampling(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    g = p.add_argument_group("sampling (recorded with the results)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="max tokens per sampled response")
    g.add_argument("--temperature", type=float, default=1.0, help="1 samples from the policy itself (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off, default)")
    g.add_argument("--sample-seed", type=int, default=0, help="sampling seed")
    g.add_argument("--batch-size", type=int, default=256, help="rows per generate() call")


def _add_gold(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gold", default="world",
                   help="gold scorer: 'world' (embedded world), 'world:DIR', a reward-model directory or hub name "
                        "(AutoModelForSequenceClassification, one output), or 'module:function' "
                        "(function(prompts, responses) -> list of floats). Default: world")
    p.add_argument("--gold-template", default=None,
                   help="for a hub reward model trained on another text format: the text it scores, e.g. "
                        "'{prompt}\\n{response}' (default: prompt and response tokenized as chipo reward trains)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chipo lab", description="The overoptimization lab: watch DPO "
                                     "overoptimize and chiPO hold.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", prog="chipo demo", help="the whole experiment on the embedded world (<= 10 min, 2 CPUs)",
                       description="World (pi_ref by SFT, cached), preference data from pi_ref with gold "
                                   "Bradley-Terry labels, DPO and chiPO over two betas, several epochs and seeds, "
                                   "evaluation, report.md with plots. Rerunning resumes finished runs.")
    p.add_argument("--quick", action="store_true", help="smoke-test size: 1 seed, 4 epochs (< 2 min)")
    p.add_argument("--full", action="store_true",
                   help="also standard RLHF (reward model + RL with kl and chi2mix), best-of-n and inference-time "
                        "pessimism on the same world and data, in the report (adds about 3 minutes on 2 cores)")
    p.add_argument("--out", default="chipo-demo", help="output directory (default: ./chipo-demo)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes (default 2)")
    p.add_argument("--world-cache", default=None, help="world cache directory (default ~/.cache/chipo/world)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("generate-prefs", help="preference data by the seed's process",
                       description="For each prompt, sample two responses from the policy (pi_ref), order them by a "
                                   "Bradley-Terry draw with the gold reward, P[y1 > y2] = sigmoid(scale (r(y1) - "
                                   "r(y2))), and write standard prompt/chosen/rejected JSON lines that `chipo train` "
                                   "reads (with the gold rewards as extra columns). A .meta.json records settings.")
    p.add_argument("--policy", required=True, help="pi_ref: HF causal LM directory or hub name")
    p.add_argument("--prompts", required=True, help="prompt dataset (jsonl/json/parquet/arrow/dir/hub) with a "
                                                    "'prompt' column")
    p.add_argument("--split", default="train")
    p.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts")
    p.add_argument("--pairs-per-prompt", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0, help="Bradley-Terry scale s on the gold reward (default 1)")
    p.add_argument("--out", required=True, help="output .jsonl")
    _add_gold(p)
    _add_sampling(p)

    p = sub.add_parser("evaluate", help="evaluate a policy against pi_ref under the gold reward",
                       description="Gold reward mean and s.e., win rate vs pi_ref samples and vs reference "
                                   "responses, Monte-Carlo KL and chi-squared (with its variance caveat), length, "
                                   "implicit-reward accuracy on held-out pairs; exact metrics on the embedded world.")
    p.add_argument("--policy", required=True, help="policy: HF causal LM directory or hub name")
    p.add_argument("--ref", required=True, help="pi_ref: HF causal LM directory or hub name")
    p.add_argument("--prompts", required=True, help="held-out prompts ('prompt', optional 'reference' column)")
    p.add_argument("--split", default="train")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--heldout-prefs", default=None, help="held-out preference pairs (implicit-reward accuracy)")
    p.add_argument("--loss", default="chipo", help="loss whose implicit reward is scored (default chipo)")
    p.add_argument("--beta", type=float, default=None, help="beta of the implicit reward")
    p.add_argument("--num-samples", type=int, default=16, help="samples per prompt (default 16)")
    p.add_argument("--no-exact", action="store_true", help="skip exact metrics even when available")
    p.add_argument("--out", default=None, help="write the metrics as JSON here (default: print)")
    _add_gold(p)
    _add_sampling(p)

    p = sub.add_parser("sweep", help="losses x betas x epochs x seeds, resumable",
                       description="One training run per (loss, beta, seed) with a checkpoint per epoch and a "
                                   "constant learning rate; each requested epoch is evaluated from its checkpoint. "
                                   "results.jsonl grows one row per evaluated epoch; a rerun skips finished runs.")
    p.add_argument("--ref", required=True, help="pi_ref (also the initial policy)")
    p.add_argument("--train-prefs", required=True, help="training preference data; '{seed}' in the path selects one "
                                                        "dataset per seed")
    p.add_argument("--eval-prompts", required=True, help="held-out prompts")
    p.add_argument("--heldout-prefs", default=None, help="held-out preference pairs")
    p.add_argument("--split", default="train")
    p.add_argument("--losses", type=_strs, default=["dpo", "chipo"], help="comma-separated (default dpo,chipo)")
    p.add_argument("--betas", type=_floats, default=[0.05, 0.005], help="comma-separated (default 0.05,0.005)")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--eval-epochs", type=_ints, default=None, help="default 1,2,4,... and the last")
    p.add_argument("--lr", type=float, default=1e-3, help="constant learning rate")
    p.add_argument("--train-batch-size", type=int, default=32)
    p.add_argument("--r-max", type=_r_max, default=None, help="chiPO margin clip bound (default: chiPO's own, 5)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--num-samples", type=int, default=64, help="samples per held-out prompt")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--no-exact", action="store_true")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--workers", type=int, default=1, help="parallel training processes")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--report", action="store_true", help="write the report when done")
    _add_gold(p)
    _add_sampling(p)

    p = sub.add_parser("report", help="report.md, plots, results.json/csv from a sweep directory",
                       description="Aggregate results.jsonl over seeds: win rate vs epochs per beta, gold reward vs "
                                   "sqrt(KL), divergences, the paper's Table 1 layout, claim checks.")
    p.add_argument("sweep_dir", help="directory holding results.jsonl")
    p.add_argument("--out", default=None, help="report directory (default SWEEP_DIR/report)")
    return parser


def _sampling(args):
    from chipo.generation import SamplingSettings

    return SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.sample_seed, batch_size=args.batch_size)


def _load_lm(name: str):
    from chipo.models import load_causal_lm, load_tokenizer

    return load_causal_lm(name).eval(), load_tokenizer(name)


def cmd_demo(args) -> int:
    from chipo.lab.demo import DemoSettings, run_demo

    if args.quick:
        settings = DemoSettings.quick(seeds=args.seeds or 1)
    else:
        settings = DemoSettings(seeds=args.seeds or 3)
    if settings.seeds < 1:
        raise ValueError("--seeds must be at least 1")
    import dataclasses

    settings = dataclasses.replace(settings, workers=args.workers)
    rlhf_settings = None
    if args.full and args.quick:
        from chipo.lab.rlhf import RLHFSettings

        rlhf_settings = RLHFSettings.quick()
    run_demo(args.out, settings, progress=not args.no_progress, world_cache=args.world_cache, full=args.full,
             rlhf_settings=rlhf_settings)
    return 0


def cmd_generate(args) -> int:
    from chipo.io import write_json, write_jsonl
    from chipo.lab.generate import generate_preferences
    from chipo.lab.sweep import load_prompts
    from chipo.rewards import load_scorer

    prompts, _ = load_prompts(args.prompts, args.split, args.max_prompts)
    model, tokenizer = _load_lm(args.policy)
    gold = load_scorer(args.gold, template=args.gold_template)
    rows, stats = generate_preferences(model, tokenizer, prompts, gold, pairs_per_prompt=args.pairs_per_prompt,
                                       scale=args.scale, settings=_sampling(args))
    write_jsonl(args.out, rows)
    write_json(args.out + ".meta.json", {**stats.__dict__, "policy": args.policy, "prompts": args.prompts})
    print(f"wrote {stats.pairs} pairs to {args.out} (dropped {stats.dropped_empty} with an empty response; labels "
          f"agree with the gold ranking on {100 * stats.label_agrees_with_gold:.1f}%)")
    return 0


def cmd_evaluate(args) -> int:
    from chipo.io import write_json
    from chipo.lab.evaluate import build_baseline, evaluate_policy
    from chipo.lab.sweep import load_pairs, load_prompts
    from chipo.rewards import load_scorer

    prompts, references = load_prompts(args.prompts, args.split, args.max_prompts)
    heldout = load_pairs(args.heldout_prefs, args.split) if args.heldout_prefs else None
    ref, tokenizer = _load_lm(args.ref)
    policy, _ = _load_lm(args.policy)
    gold = load_scorer(args.gold, template=args.gold_template)
    settings = _sampling(args)
    baseline = build_baseline(ref, tokenizer, prompts, gold, references=references, settings=settings,
                              num_samples=args.num_samples, heldout_pairs=heldout, exact=not args.no_exact)
    metrics = evaluate_policy(policy, ref, tokenizer, gold, baseline, settings=settings,
                              num_samples=args.num_samples, loss=args.loss if args.beta else None, beta=args.beta)
    metrics.update({"policy": args.policy, "ref": args.ref, "prompts": args.prompts, "gold": args.gold})
    if args.out:
        write_json(args.out, metrics)
        print(f"wrote {args.out}")
    else:
        print(json.dumps({k: v for k, v in metrics.items() if k != "examples"}, indent=2, default=float))
    return 0


def cmd_sweep(args) -> int:
    from chipo.lab.report import write_report
    from chipo.lab.sweep import Sweep, SweepConfig

    config = SweepConfig(
        ref_model=args.ref, train_prefs=args.train_prefs, eval_prompts=args.eval_prompts, out_dir=args.out,
        gold=args.gold, gold_template=args.gold_template, heldout_prefs=args.heldout_prefs, split=args.split,
        losses=args.losses, betas=args.betas, seeds=args.seeds, epochs=args.epochs, eval_epochs=args.eval_epochs,
        learning_rate=args.lr, batch_size=args.train_batch_size, r_max=args.r_max, max_length=args.max_length,
        num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, sample_seed=args.sample_seed, max_eval_prompts=args.max_prompts, exact=not args.no_exact,
        keep_checkpoints=args.keep_checkpoints,
    )
    start = time.perf_counter()
    rows = Sweep(config, workers=args.workers).run()
    print(f"{len(rows)} result rows in {args.out}/results.jsonl ({time.perf_counter() - start:.0f} s)")
    if args.report:
        print(f"report: {write_report(args.out)}")
    return 0


def cmd_report(args) -> int:
    from chipo.lab.report import write_report

    print(f"report: {write_report(args.sweep_dir, args.out)}")
    return 0


COMMANDS = {"demo": cmd_demo, "generate-prefs": cmd_generate, "evaluate": cmd_evaluate, "sweep": cmd_sweep,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``main(["demo", "--quick"])``; returns the exit status."""
    from chipo.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # DataError is a ValueError: bad input gets one line, not a traceback.
        print(f"chipo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
