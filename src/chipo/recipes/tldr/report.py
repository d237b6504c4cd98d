"""The report stage: the paper's Table 1 layout, KL per cell, plots, GPU time and the exact commands.

Everything is computed from the recipe directory (generation metas, judge results, ``done.json`` of the runs,
``commands.log``); nothing is typed in by hand. Output (``<out_dir>/report/``, replaced atomically):

- ``report.md``: setup, Table 1 (rows beta, columns epochs, cells "chiPO vs DPO" win rate against the reference
  summaries in percent, mean +- standard error), KL to pi_ref per cell, judge accounting, GPU time (estimated from
  FLOPs, and measured), the commands that produced the directory;
- ``table1.md``, ``kl.md``: the two tables alone; ``winrate_vs_epochs.png``, ``kl_vs_epochs.png``;
- ``results.json`` / ``results.csv``: one row per cell (loss, beta, seed, epoch) with every number.

Standard errors are over seeds (the spread of the per-seed win rates) when a cell has two or more seeds; with one
seed they are the judge's standard error over prompts, marked with a dagger. Aggregation over seeds is
``chipo.lab.tables.aggregate``, the lab's; the SFT model is the epoch-0 row (``pi_ref``) of every curve.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

from chipo.config import ConfigError
from chipo.io import read_json, staged_into
from chipo.lab import tables
from chipo.lab.plots import colors
from chipo.markdown import markdown_table
from chipo.recipes.tldr.config import ReportStageConfig
from chipo.recipes.tldr.cost import render_markdown as cost_markdown
from chipo.recipes.tldr.cost import resolve_params
from chipo.recipes.tldr.judge import generated_cells
from chipo.recipes.tldr.layout import SFT_CELL, Layout

METRICS = ["win", "kl_k3", "kl_k1", "chi2_mc", "length_mean", "invalid_frac"]
LOSS_LABELS = {"dpo": "DPO", "chipo": "chiPO", "pi_ref": "SFT (pi_ref)"}


def aggregate(rows: list[dict]) -> dict:
    """{(loss, beta, epoch): {metric: (mean over seeds, s.e., seeds)}} via the lab's results table
    (``chipo.lab.tables.aggregate``); the SFT rows (beta None) are their own group."""
    df = tables.results_table(rows)
    df["beta"] = df["beta"].astype(float).fillna(-1.0)  # groupby drops NaN keys: give pi_ref a placeholder beta
    for name in METRICS:
        if name not in df:
            df[name] = math.nan
    out = {}
    for r in tables.aggregate(df, METRICS).to_dict("records"):
        beta = None if r["beta"] == -1.0 else r["beta"]
        out[(r["method"], beta, int(r["epoch"]))] = {m: (r[m], r[f"{m}_se"], int(r["n"])) for m in METRICS}
    sft = out.get(("pi_ref", None, 0))
    if sft is not None:  # the SFT model is epoch 0 of every (loss, beta) curve
        for loss, beta in {(m, b) for m, b, _ in out if m != "pi_ref"}:
            out[(loss, beta, 0)] = sft
    return out
DAGGER = "†"


def pick_tag(config: ReportStageConfig, layout: Layout) -> str:
    tags = layout.judge_tags()
    if config.tag:
        if config.tag not in tags:
            raise ConfigError(f"no judge results tagged {config.tag!r} under {layout.root / 'judgements'} "
                              f"(found: {', '.join(tags) or 'none'})")
        return config.tag
    if len(tags) != 1:
        raise ConfigError(f"{'no judge results' if not tags else 'several judges'} under "
                          f"{layout.root / 'judgements'}" + (f" ({', '.join(tags)}): choose one with tag=..."
                                                            if tags else ": run the judge stage first"))
    return tags[0]


def collect_rows(layout: Layout, tag: str, max_invalid_frac: float) -> list[dict]:
    """One row per generated cell: its KL estimates and, when judged, its win rate with the judge's counts."""
    rows = []
    for cell, meta in generated_cells(layout):
        result = read_json(layout.judgement(tag, cell)[0]) or {}
        row = {"loss": "pi_ref" if cell.loss == SFT_CELL else cell.loss, "beta": cell.beta, "seed": cell.seed,
               "epoch": cell.epoch, "cell": cell.name, "judged": bool(result)}
        for name in ("kl_k1", "kl_k1_se", "kl_k3", "kl_k3_se", "chi2_mc", "chi2_mc_se", "length_mean",
                     "finished_frac", "n", "seconds", "device", "backend"):
            row[("gen_" if name in ("seconds", "n") else "") + name] = meta.get(name)
        if result:
            row.update({"win": result["win_rate"], "win_se": result["stderr"], "judge": result["judge"],
                        "valid": result["valid"], "malformed": result["malformed"], "errors": result["errors"],
                        "invalid_frac": result["invalid_frac"], "judge_seconds": result["seconds"],
                        "flagged": result["invalid_frac"] > max_invalid_frac})
        rows.append(row)
    return rows


class Stats:
    """Per (loss, beta, epoch): mean over seeds and its standard error (seeds, or the judge's with one seed)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.agg = aggregate(rows)

    def members(self, loss: str, beta: float, epoch: int) -> list[dict]:
        if epoch == 0:
            return [r for r in self.rows if r["loss"] == "pi_ref"]
        return [r for r in self.rows if (r["loss"], r["beta"], r["epoch"]) == (loss, beta, epoch)]

    def get(self, loss: str, beta: float, epoch: int, name: str) -> tuple[float, float, int, bool]:
        """(mean, se, seeds, se_is_within_seed)."""
        mean, se, n = self.agg.get((loss, beta, epoch), {}).get(name, (math.nan, math.nan, 0))
        if n == 1:  # one seed: the only uncertainty we have is the sampling one within it
            (row,) = [r for r in self.members(loss, beta, epoch) if r.get(name) is not None]
            value = row.get(f"{name}_se")
            return mean, (math.nan if value is None else float(value)), 1, True
        return mean, se, n, False

    def flagged(self, loss: str, beta: float, epoch: int) -> bool:
        return any(r.get("flagged") for r in self.members(loss, beta, epoch))


def _pct(stat: tuple, flag: bool = False) -> str:
    mean, se, _, within = stat
    if math.isnan(mean):
        return "n/a"
    text = f"{100 * mean:.1f}" + ("" if math.isnan(se) else f" ± {100 * se:.1f}") + (DAGGER if within else "")
    return text + ("*" if flag else "")


def _num(stat: tuple) -> str:
    mean, se, _, within = stat
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3g}" + ("" if math.isnan(se) else f" ± {se:.2g}") + (DAGGER if within else "")


def grid(rows: list[dict]) -> tuple[list[float], list[int], list[str]]:
    """(betas descending, epochs > 0 ascending, losses: DPO/chiPO first) present in the rows."""
    betas = sorted({r["beta"] for r in rows if r["beta"] is not None}, reverse=True)
    epochs = sorted({r["epoch"] for r in rows if r["epoch"] > 0})
    losses = sorted({r["loss"] for r in rows if r["loss"] != "pi_ref"},
                    key=lambda x: (x not in ("chipo", "dpo"), x != "chipo", x))
    return betas, epochs, losses


def table1(stats: Stats, rows: list[dict]) -> str:
    """Rows beta, columns epochs, cells 'chiPO vs DPO' win rates (%) +- s.e. (the paper's Table 1 layout)."""
    betas, epochs, _ = grid(rows)

    def cell(beta: float, e: int) -> str:
        return (f"{_pct(stats.get('chipo', beta, e, 'win'), stats.flagged('chipo', beta, e))} vs "
                f"{_pct(stats.get('dpo', beta, e, 'win'), stats.flagged('dpo', beta, e))}")

    head = ["beta"] + [f"epochs {e} (chiPO vs DPO)" if i == 0 else f"{e}" for i, e in enumerate(epochs)]
    return markdown_table(head, ([f"{beta:g}", *(cell(beta, e) for e in epochs)] for beta in betas))


def kl_table(stats: Stats, rows: list[dict]) -> str:
    """KL(pi || pi_ref) (k3 estimate, nats) per loss x beta (rows) and epoch (columns), epoch 0 = SFT."""
    betas, epochs, losses = grid(rows)
    return markdown_table(["loss", "beta", *(f"epoch {e}" for e in [0, *epochs])],
                          ([LOSS_LABELS.get(loss, loss), f"{beta:g}", *(_num(stats.get(loss, beta, e, "kl_k3"))
                                                                        for e in [0, *epochs])]
                           for beta in betas for loss in losses))


def per_seed_table(rows: list[dict]) -> str:
    betas, epochs, losses = grid(rows)
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    out = []
    for beta in betas:
        for loss in losses:
            for seed in seeds:
                got = {r["epoch"]: r for r in rows if (r["loss"], r["beta"], r["seed"]) == (loss, beta, seed)}
                if not got:
                    continue
                cells = []
                for e in epochs:
                    r = got.get(e)
                    win = r.get("win") if r else None
                    cells.append("n/a" if r is None else
                                 f"{'n/a' if win is None else f'{100 * win:.1f}'} / {r['kl_k3']:.3g}")
                out.append([LOSS_LABELS.get(loss, loss), f"{beta:g}", seed, *cells])
    return markdown_table(["loss", "beta", "seed", *(f"epoch {e}: win % / KL" for e in epochs)], out)


def plot(stats: Stats, rows: list[dict], out: Path) -> list[str]:
    """Win rate vs epochs and KL vs epochs, one panel per beta, every loss on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas, epochs, losses = grid(rows)
    xs = [0, *epochs]  # equal spacing: 0 (SFT), 1, 2, 4 read better than a linear axis
    files = []
    for name, fname, ylabel, scale in (
            ("win", "winrate_vs_epochs.png", "win rate vs reference summaries (%)", 100.0),
            ("kl_k3", "kl_vs_epochs.png", "KL(pi || pi_ref) (nats, Monte-Carlo k3)", 1.0)):
        fig, axes = plt.subplots(1, max(len(betas), 1), figsize=(5 * max(len(betas), 1), 4), squeeze=False,
                                 sharey=True)
        for ax, beta in zip(axes[0], betas):
            for loss in losses:
                points = [(i, stats.get(loss, beta, e, name)) for i, e in enumerate(xs)]
                points = [(i, s) for i, s in points if not math.isnan(s[0])]
                if not points:
                    continue
                ax.errorbar([i for i, _ in points], [scale * s[0] for _, s in points],
                            yerr=[0.0 if math.isnan(s[1]) else scale * s[1] for _, s in points], marker="o",
                            capsize=3, label=LOSS_LABELS.get(loss, loss), color=colors(losses)[loss])
            ax.set_xticks(range(len(xs)), ["0 (SFT)", *map(str, epochs)])
            ax.set_xlabel("epochs")
            ax.set_title(f"beta = {beta:g}")
            ax.grid(alpha=0.3)
            if name == "win":
                ax.axhline(50, color="grey", ls="--", lw=1)
                ax.set_ylim(0, 100)
            elif any(stats.get(loss, beta, e, name)[0] > 0 for loss in losses for e in epochs):
                ax.set_yscale("symlog", linthresh=0.1)
        axes[0][0].set_ylabel(ylabel)
        axes[0][0].legend()
        fig.suptitle(("Win rate against the reference summaries" if name == "win" else "Distribution shift "
                      "from pi_ref") + " (mean ± s.e.)")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


def measured_times(layout: Layout, rows: list[dict], sft_model: str | None) -> str:
    """Wall-clock seconds each stage took for this directory (as recorded by the stages)."""
    def took(seconds: float) -> str:
        return f"{seconds / 3600:.3f} h ({seconds:.0f} s)"

    out = []
    if sft_model and Path(sft_model, "metrics.jsonl").is_file():
        records = [json.loads(x) for x in Path(sft_model, "metrics.jsonl").read_text().splitlines() if x.strip()]
        runtime = next((r["train_runtime"] for r in reversed(records) if "train_runtime" in r), None)
        if runtime is not None:
            out.append(["sft", took(runtime), sft_model])
    runs = layout.finished_runs()
    if runs:
        total = sum(r.get("train_seconds") or 0.0 for r in runs)
        out.append([f"sweep ({len(runs)} runs, reference log-probs included)", took(total), layout.runs])
    devices = sorted({f"{r.get('device')}, {r.get('backend')}" for r in rows})
    out.append([f"generate ({len(rows)} cells)", took(sum(r.get("gen_seconds") or 0.0 for r in rows)),
                "; ".join(devices)])
    out.append(["judge", took(sum(r.get("judge_seconds") or 0.0 for r in rows)), ""])
    return markdown_table(["stage", "measured wall-clock", "where"], out)


def commands(layout: Layout, sft_model: str | None, argv: list[str] | None) -> list[str]:
    """The SFT stage's and the recipe directory's commands.log, and the running report command."""
    logs = [Path(sft_model) / "commands.log"] if sft_model else []
    logs.append(layout.commands_log)
    lines = [x for log in logs if log.is_file() for x in log.read_text().splitlines() if x.strip()]
    if argv and shlex.join(["chipo", *argv]) not in lines:
        lines.append(shlex.join(["chipo", *argv]))
    return lines or ["(no commands.log: the stages were run through the Python API)"]


def setup_section(sweep: dict, metas: list[dict], rows: list[dict], tag: str) -> list[str]:
    """What was trained, sampled and judged (from the sweep's config and the generation metas)."""
    sampling = sorted({json.dumps({k: v for k, v in m["sampling"].items() if k != "seed"}, sort_keys=True)
                       for m in metas})
    subset = metas[0]["prompts"] if metas else {}
    judges = sorted({r["judge"] for r in rows if r.get("judge")})
    betas, epochs, losses = grid(rows)
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    limit = f", first {sweep['max_train_samples']} pairs" if sweep.get("max_train_samples") else ""
    out = ["## Setup", "",
           f"- pi_ref (SFT model): `{sweep.get('sft_model')}`; preference data: `{sweep.get('dataset')}` "
           f"(split {sweep.get('split')}{limit})",
           f"- losses: {', '.join(LOSS_LABELS.get(x, x) for x in losses)}; betas: "
           f"{', '.join(f'{b:g}' for b in betas)}; seeds: {', '.join(map(str, seeds))}; epochs per run: "
           f"{sweep.get('epochs')}, reported: {', '.join(map(str, epochs))}; learning rate "
           f"{sweep.get('learning_rate')} "
           f"constant after {sweep.get('warmup_epochs')} epoch(s) of warm-up, batch "
           f"{sweep.get('per_device_train_batch_size')} x {sweep.get('gradient_accumulation_steps')} (x GPUs)",
           f"- test prompts: {subset.get('rows')} rows of `{subset.get('dataset')}` split {subset.get('split')} "
           f"(sha256 {str(subset.get('sha256'))[:12]}...); one sample per prompt and cell",
           f"- sampling: {'; '.join(sampling) or 'n/a'}"
           + (" -- WARNING: cells were sampled with different settings" if len(sampling) > 1 else ""),
           f"- judge `{tag}`: {', '.join(judges) or 'n/a'}; win rate of the policy's summary over the reference "
           "summary, ties 1/2", ""]
    if any(s.get("temperature", 1.0) != 1.0 or s.get("top_p", 1.0) != 1.0 or s.get("top_k", 0)
           for s in map(json.loads, sampling)):
        out += ["Note: samples are not from pi itself (temperature/top-p/top-k), so the KL columns estimate the "
                "divergence of the *sampling* distribution's log-ratio, not KL(pi || pi_ref).", ""]
    return out


def results_sections(config: ReportStageConfig, stats: Stats, rows: list[dict], plots: list[str]) -> list[str]:
    """Table 1's layout, the KL table, the plots and the per-seed table, each with what its numbers are."""
    betas, _, losses = grid(rows)
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    sft_win = stats.get(losses[0] if losses else "dpo", betas[0] if betas else 0.0, 0, "win")
    se_note = (f"{DAGGER}: one seed, so the standard error is the judge's over prompts; otherwise it is over seeds. "
               f"*: more than {config.max_invalid_frac:.0%} of the cell's comparisons got no verdict.")
    return ["## Result in the layout of the paper's Table 1", "",
            f"Win rate (%) against the reference summaries, mean ± standard error over {len(seeds)} seed(s): "
            "chiPO vs DPO.", "", table1(stats, rows), "",
            f"SFT model (pi_ref, epoch 0): {_pct(sft_win)}.",
            "", se_note, "", "## Distribution shift from pi_ref", "",
            "KL(pi || pi_ref) in nats per summary, Monte-Carlo k3 estimate E_pi[1/z - 1 + log z] on each cell's own "
            "samples (z = pi(y|x) / pi_ref(y|x) of the whole summary), mean ± s.e.", "", kl_table(stats, rows), "",
            "## Plots", "", *[f"![{p}]({p})" for p in plots], "",
            "## Per seed", "", per_seed_table(rows), ""]


def judge_accounting(config: ReportStageConfig, rows: list[dict]) -> list[str]:
    """How many comparisons were judged, with a verdict, malformed or failed; flagged and unjudged cells."""
    unjudged = [r["cell"] for r in rows if not r["judged"]]
    flagged = [r["cell"] for r in rows if r.get("flagged")]
    return ["## Judge accounting", "",
            f"- comparisons: {sum(r.get('gen_n') or 0 for r in rows if r['judged'])} in {len(rows) - len(unjudged)} "
            f"judged cells; with a verdict: {sum(r.get('valid') or 0 for r in rows)}; malformed replies: "
            f"{sum(r.get('malformed') or 0 for r in rows)}; failed requests: {sum(r.get('errors') or 0 for r in rows)}",
            f"- flagged cells (> {config.max_invalid_frac:.0%} without a verdict): {', '.join(flagged) or 'none'}",
            f"- not judged yet: {', '.join(unjudged) or 'none'}", ""]


def gpu_time_section(config: ReportStageConfig, layout: Layout, sweep: dict, metas: list[dict],
                     rows: list[dict]) -> list[str]:
    """The FLOP estimate for this directory's runs and cells (``chipo tldr cost``'s table), then the measured time."""
    runs = layout.finished_runs()
    assumptions = config
    if runs or metas:
        import dataclasses

        subset = metas[0]["prompts"] if metas else {}
        assumptions = dataclasses.replace(
            config, runs=len(runs) or config.runs, epochs=int(sweep.get("epochs") or config.epochs),
            eval_cells=len(metas) or config.eval_cells, eval_prompts=int(subset.get("n") or config.eval_prompts))
    n_params, source = resolve_params(assumptions, sweep.get("sft_model"))
    return ["## GPU time", "", "Estimated from FLOPs for this directory's runs and cells (`chipo tldr cost` for "
            "other sizes):", "", cost_markdown(assumptions, n_params, source), "", "Measured:", "",
            measured_times(layout, rows, sweep.get("sft_model")), ""]


def render(config: ReportStageConfig, layout: Layout, tag: str, rows: list[dict], stats: Stats,
           plots: list[str], argv: list[str] | None = None) -> str:
    sweep = (read_json(layout.sweep_json) or {}).get("config", {})
    metas = [m for _, m in generated_cells(layout)]
    out = ["# TL;DR: chiPO vs DPO (chipo recipe report)", ""]
    out += setup_section(sweep, metas, rows, tag)
    out += results_sections(config, stats, rows, plots)
    out += judge_accounting(config, rows)
    out += gpu_time_section(config, layout, sweep, metas, rows)
    out += ["## Commands", "", "The stage commands that produced this directory, in order:", "", "```",
            *commands(layout, sweep.get("sft_model"), argv), "```", "",
            "Raw numbers: `results.json`, `results.csv` (one row per cell); tables alone: `table1.md`, `kl.md`."]
    return "\n".join(out) + "\n"


def write_report(config: ReportStageConfig, argv: list[str] | None = None) -> Path:
    """Write the report directory (the new report replaces the old one's files once complete); returns the path of
    report.md."""
    from chipo.train.experiment_dir import open_experiment  # imports transformers: not at module import

    layout = Layout(config.out_dir)
    tag = pick_tag(config, layout)
    rows = collect_rows(layout, tag, config.max_invalid_frac)
    if not any(r["judged"] for r in rows):
        raise ConfigError(f"no judged cells for tag {tag!r}: run the judge stage first")
    stats = Stats(rows)
    final = Path(config.output_dir) if config.output_dir else layout.root / "report"
    # A report directory is an experiment directory: one writer at a time, never someone else's folder cleared.
    # The new report is built beside the old one and replaces only the previous report's files.
    with open_experiment(final, {"tag": tag}, what="TL;DR report", replace_key=True,
                         label="output_dir") as exp, staged_into(final) as tmp:
        plots = plot(stats, rows, tmp)
        (tmp / "table1.md").write_text(table1(stats, rows) + "\n")
        (tmp / "kl.md").write_text(kl_table(stats, rows) + "\n")
        (tmp / "results.json").write_text(json.dumps({"tag": tag, "rows": rows}, indent=2) + "\n")
        tables.results_table(rows).to_csv(tmp / "results.csv", index=False)
        (tmp / "report.md").write_text(render(config, layout, tag, rows, stats, plots, argv))
        exp.clear(keep=[tmp.name])  # the previous report's files, once the new one is complete
    return final / "report.md"
