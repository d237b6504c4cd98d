"""``chipo bandit <experiment>``: run the exact tabular testbed's experiments.

Usage: ``chipo bandit {regret,bound,overopt,online,bench,all} [--out DIR] [--seeds N] [--quick]``
(also ``python -m chipo.bandit ...``). Each experiment writes DIR/<experiment>/{report.md, *.png, results.json};
``all`` also writes DIR/report.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from chipo.bandit.experiments import EXPERIMENTS, Settings, run_all, run_experiment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chipo bandit", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=(*EXPERIMENTS, "bench", "all"), help="which experiment to run")
    parser.add_argument("--out", type=Path, default=Path("bandit-results"), help="output directory")
    parser.add_argument("--seeds", type=int, default=None,
                        help="evaluation seeds per setting (default 5, or 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny grids: the whole suite in seconds (smoke test)")
    parser.add_argument("--kl-trap-n", default=None, metavar="N1,N2,...",
                        help="regret: comma-separated sample sizes for the kl_trap curve (default 100,...,30000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if seeds < 1:
        print("--seeds must be at least 1", file=sys.stderr)
        return 2
    kl_trap_n = None
    if args.kl_trap_n is not None:
        try:
            kl_trap_n = tuple(int(v) for v in args.kl_trap_n.split(","))
        except ValueError:
            kl_trap_n = ()
        if not kl_trap_n or min(kl_trap_n) < 2:
            print(f"--kl-trap-n must be comma-separated integers >= 2, got {args.kl_trap_n!r}", file=sys.stderr)
            return 2
    settings = Settings(seeds=seeds, tune_seeds=1 if args.quick else 3, quick=args.quick, kl_trap_n=kl_trap_n)
    t0 = time.perf_counter()
    if args.experiment == "all":
        path = run_all(args.out, settings) / "report.md"
    else:
        path = run_experiment(args.experiment, args.out, settings)[0] / "report.md"
    if args.experiment in ("bound", "all"):
        bound = json.loads((args.out / "bound" / "results.json").read_text())
        print(f"bound: sanity check of Cauchy-Schwarz (cannot fail for correct code): {bound['violations']} "
              f"violations in {bound['n_checks']} checks")
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
