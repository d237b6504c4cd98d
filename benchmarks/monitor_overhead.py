"""What the overoptimization monitor (``monitor=warn``, its default settings) adds to a ``chipo train`` run.

    python benchmarks/monitor_overhead.py [--repeats N] [--epochs E] [--workdir DIR] [--out FILE]

The compute configuration of ``vs_trl.py`` (3.3M-parameter Llama, vocab 512, 512 pairs, batch 16, max_length 160,
one epoch = 32 steps, DPO beta 0.1, fp32, one torch thread) plus 64 held-out pairs (``eval_split``, so chipo
evaluates at each epoch end, its default with evaluation data): whole ``chipo train`` processes with
``monitor=off`` and ``monitor=warn`` (16 prompts x 8 samples x up to 64 new tokens per measurement, held-out pairs,
pi_ref's calibration once at the start), alternated so the shared machine's drift hits both alike. Reported per
run: wall time, CPU time of the child process (user + system, ``RUSAGE_CHILDREN``), and the 1-minute load average
before and after. The reference log-prob cache is filled by a first, uncounted run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402


def one_run(assets: Path, workdir: Path, tag: str, monitor: str, epochs: int) -> dict:
    cfg = vs_trl.CONFIGS["compute"]
    args = [sys.executable, "-m", "chipo.cli.main", "train", f"model={assets / 'model'}",
            f"dataset={assets / 'train.jsonl'}", f"eval_dataset={assets / 'heldout.jsonl'}",
            f"output_dir={workdir / tag}", "overwrite_output_dir=true", f"ref_cache_dir={workdir / 'ref_cache'}",
            "loss=dpo", "beta=0.1", "learning_rate=1e-4", "seed=42", "logging_steps=10", "save_strategy=no",
            f"per_device_train_batch_size={cfg['batch']}", f"max_length={cfg['max_length']}",
            f"num_train_epochs={epochs}", "disable_tqdm=true", f"monitor={monitor}", "optim=adamw_torch_fused"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{tag}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    monitor_rows = workdir / tag / "monitor.jsonl"
    return {"monitor": monitor, "wall_s": wall,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "load_1min": [load, os.getloadavg()[0]],
            "measurements": len(monitor_rows.read_text().splitlines()) if monitor_rows.is_file() else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    a = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="chipo-monitor-bench-"))
    assets = workdir / "assets"
    stats = vs_trl.build_assets(vs_trl.CONFIGS["compute"], assets)
    rows = (assets / "train.jsonl").read_text().splitlines()
    (assets / "heldout.jsonl").write_text("\n".join(rows[:64]) + "\n")  # cost, not generalisation, is measured
    one_run(assets, workdir, "cold", "off", 1)  # fills the reference cache
    runs: dict[str, list] = {"off": [], "warn": []}
    for i in range(a.repeats):
        for monitor in ("off", "warn") if i % 2 == 0 else ("warn", "off"):
            r = one_run(assets, workdir, f"{i}-{monitor}", monitor, a.epochs)
            runs[monitor].append(r)
            print(f"  monitor={monitor:4s} wall {r['wall_s']:6.1f} s  cpu {r['cpu_s']:6.1f} s  load "
                  f"{r['load_1min'][0]:.1f}/{r['load_1min'][1]:.1f}  measurements {r['measurements']}", flush=True)
    summary = {"config": dict(vs_trl.CONFIGS["compute"], epochs=a.epochs, heldout_pairs=64), "assets": stats,
               "runs": runs}
    for key in ("wall_s", "cpu_s"):
        off = statistics.mean(r[key] for r in runs["off"])
        warn = statistics.mean(r[key] for r in runs["warn"])
        summary[f"overhead_{key}"] = warn / off - 1.0
        print(f"{key}: off {off:.1f}, warn {warn:.1f}, overhead {100 * (warn / off - 1):+.1f}%")
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
