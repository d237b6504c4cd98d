"""``chipo demo``: the overoptimization experiments on the embedded world, on a laptop, composed by name.

``run_demo`` runs a list of the lab's experiments (``chipo.lab.experiments``) into one directory and writes one
report: the first experiment's page (the offline sweep, ``chipo.lab.offline``: DPO vs chiPO, Huang et al. 2024,
arXiv 2407.13399) followed by every other experiment's section. ``chipo demo`` runs ``offline``; ``--full`` adds
``rlhf`` (reward model, RL with kl and chi2mix, best-of-n, pessimism: ``chipo.lab.rlhf``) and ``online`` (online
DPO / chiPO, XPO, chi-squared XPO at the same label budget: ``chipo.lab.online``); ``experiments=`` names any
registered ones (each preceded by those it needs). Resumable: a rerun reuses finished runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from chipo.lab import experiments
from chipo.lab.experiments import cpu_seconds, load_average
from chipo.lab.protocol import DEMO_EXPERIMENTS, DemoSettings


def run_demo(out_dir: str | os.PathLike, settings: dict | None = None, progress: bool = True,
             world_cache: str | None = None, echo=print, workers: int = DemoSettings.workers,
             overwrite: bool = False) -> Path:
    """Run the experiments ``settings`` names (name -> settings, in order; default: ``offline`` at the protocol's
    sizes) into ``out_dir`` and compose their report; returns the report's path."""
    import torch

    from chipo.lab.runs import quiet_libraries

    if settings is None:
        settings = {name: experiments.get(name).settings_for() for name in DEMO_EXPERIMENTS}
    context = experiments.Context(Path(out_dir), world_cache=world_cache, progress=progress, echo=echo,
                                  workers=workers, overwrite=overwrite)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they give; parallelism is across processes
    start, cpu_start = time.perf_counter(), cpu_seconds()
    try:
        with quiet_libraries():
            experiments.run_all(context, settings)
            echo(f"[report] {', '.join(settings)}")
            report = experiments.compose_report(context, list(settings))
    finally:
        torch.set_num_threads(threads)
    for name in settings:  # each experiment's few lines for the terminal, from its results on disk
        headline = experiments.get(name).headline
        text = headline(context.dir(name)) if headline else ""
        if text:
            echo("")
            echo(text)
    echo(f"\nDone in {time.perf_counter() - start:.0f} s, {cpu_seconds() - cpu_start:.0f} CPU-s in all processes, load "
         f"average now {load_average()}. Report: {report}  (verdicts, plots and results.json beside it)")
    return report
