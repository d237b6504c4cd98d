"""The experiment behind docs/online-lab/variants.md: online chiPO and chi-squared XPO variants, per seed.

    python docs/online-lab/variants.py run OUT METHOD[,METHOD...] BETA[,BETA...] SEEDS [BUDGET_FACTOR]
    python docs/online-lab/variants.py table OUT_DIR [OUT_DIR...] > variants.md

``run`` trains and evaluates ``chipo.lab.online`` methods (``online-chipo.<variant>``, ``chi2-xpo.<variant>``, see
``chipo.lab.online.VARIANTS``) at the online lab's defaults (seeds 0..SEEDS-1); BUDGET_FACTOR > 1 multiplies the
label budget and evaluates at 1/3, 2/3 and all of it; it prints wall time, CPU time and load. ``table`` prints, per
(beta, method), every seed's gold reward, out-of-language mass and KL at the label budget (the largest label count
of the given result directories), and whether the out-of-language mass stayed within 10 points of pi_ref's in
every seed.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path


def run(out: str, methods: str, betas: str, seeds: str, factor: str = "1") -> None:
    import chipo.lab  # noqa: F401  (registers the world's scorers)
    from chipo.lab.online import OnlineLabSettings, run_online_lab
    from chipo.lab.world import load_or_build_world

    extra = {}
    if int(factor) > 1:
        extra = {"pairs_per_prompt": int(factor) * OnlineLabSettings.pairs_per_prompt,
                 "eval_fractions": tuple(i / 3 for i in range(1, 4))}
    settings = OnlineLabSettings(seeds=int(seeds), betas=tuple(float(b) for b in betas.split(",")),
                                 methods=tuple(methods.split(",")), **extra)
    start = time.perf_counter()
    run_online_lab(load_or_build_world(), out, settings, progress=False)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    print(f"wall {time.perf_counter() - start:.0f} s, CPU {cpu:.0f} s, load average {os.getloadavg()}")


def table(*dirs: str) -> str:
    from chipo.lab.online import LABELS
    from chipo.lab.sweep import read_results
    from chipo.markdown import markdown_table

    rows = [r for d in dirs for r in read_results(Path(d) / "results.jsonl")]
    ref = next(r for r in rows if r["method"] == "pi_ref")
    limit = ref["mass_malformed"] + 0.10
    cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
    budget = max(r["labels"] for r in rows)
    for r in rows:
        if r["method"] != "pi_ref" and r["labels"] == budget:
            cells[(r["beta"], r["method"], r["labels"])][r["seed"]] = r
    lines = [f"pi_ref: gold {ref['gold']:.3f}, out-of-language mass {100 * ref['mass_malformed']:.1f}% "
             f"(limit {100 * limit:.1f}%)", ""]
    rows = []
    for (beta, method, labels), by_seed in sorted(cells.items(), key=lambda c: (-c[0][0], c[0][1], c[0][2])):
        seeds = [by_seed[s] for s in sorted(by_seed)]
        gold = [r["gold"] for r in seeds]
        held = all(r["mass_malformed"] <= limit for r in seeds)
        rows.append([f"{beta:g}", LABELS.get(method, method), labels, f"{sum(gold) / len(gold):.3f}",
                     " ".join(f"{g:.2f}" for g in gold), " ".join(f"{100 * r['mass_malformed']:.0f}" for r in seeds),
                     " ".join(f"{r['kl']:.1f}" for r in seeds), f"{'yes' if held else 'no'} ({len(seeds)} seeds)"])
    lines.append(markdown_table(["beta", "method", "labels", "gold, mean", "gold per seed",
                                 "out-of-language % per seed", "KL per seed", "all seeds within 10 points"], rows))
    return "\n".join(lines)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "run":
        run(*args)
    else:
        print(table(*args))
