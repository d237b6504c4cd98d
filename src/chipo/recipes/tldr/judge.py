"""The judge stage: each cell's summaries against the dataset's reference summaries, by a pluggable judge.

The judge is any ``chipo.judges`` judge built from config: ``openai`` (an LLM behind an OpenAI-compatible
chat-completions endpoint, the paper's GPT-4 role; replies cached on disk, retried with backoff, candidate order
randomised per item) or ``reward-model`` (scores of a reward model by path or hub name). Per cell the result is the
policy's win rate over the reference summary (ties count 1/2) with its standard error over prompts, and the counts
of items without a verdict.

Failure modes, and what the stage does:

- an unparseable reply (``malformed``) or a request that failed after its retries (``error``): no verdict for that
  item, never a guess; the win rate is over the items with a verdict, the counts are in the result, and the report
  flags cells where more than ``max_invalid_frac`` of the items have none;
- a cell with failed requests is judged again on the next run (failed requests are not cached, so only those are
  sent again; malformed replies are cached: asking again at temperature 0 would give the same answer);
- a judge that cannot work at all (wrong URL, model or key: every request fails) stops the stage with one line
  (``JudgeError``); the cells already judged keep their results;
- a judge's endpoint settings are checked before any cell is judged (missing model or key: one-line error).

A cell is skipped when its result exists for the same samples (SHA-256 of the samples file) and the same judge
(kind, model, prompt and scoring settings; not the operational ones such as concurrency or timeouts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time

from chipo.io import read_json, read_jsonl, write_json, write_jsonl
from chipo.recipes.tldr.config import JudgeStageConfig
from chipo.recipes.tldr.layout import Cell, Layout, only_cell_files

logger = logging.getLogger("chipo.recipes.tldr")

# Settings that change how requests are made, not which verdicts come back: changing them re-judges nothing.
OPERATIONAL = {
    "openai": {"api_key", "base_url", "timeout_s", "max_attempts", "backoff_initial_s", "backoff_max_s", "jitter",
               "max_retry_after_s", "max_concurrency", "fail_fast_after", "cache", "deadline_s", "max_reply_bytes"},
    "reward-model": {"batch_size"},
}


def judge_identity(stage: JudgeStageConfig, judge_config) -> dict:
    """What decides the verdicts: a stored result is reused only for the same identity."""
    settings = {k: v for k, v in dataclasses.asdict(judge_config).items() if k not in OPERATIONAL[stage.judge]}
    identity = {"kind": stage.judge, "settings": settings, "response_prefix": stage.response_prefix}
    if stage.judge == "openai":
        from chipo.judges import TLDR_PROMPT
        from chipo.judges.config import resolve_endpoint

        # Resolving now also checks the endpoint settings (model, key) before any work.
        identity["settings"]["model"] = resolve_endpoint(judge_config)[1]
        identity["prompt"] = TLDR_PROMPT.key
    return identity


def generated_cells(layout: Layout) -> list[tuple[Cell, dict]]:
    """(cell, generation meta) of every complete generation cell, in a stable order."""
    directory = layout.generations
    out = []
    for meta_path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        meta = read_json(meta_path)
        if meta is not None and "cell" in meta:
            out.append((Cell(meta["loss"], meta["beta"], meta["seed"], meta["epoch"]), meta))
    return out


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_judge_stage(stage: JudgeStageConfig, judge_config) -> dict:
    """Judge every cell that needs it; returns counts ``{"judged", "skipped", "cells", "flagged"}``.

    ``judgements/<tag>/`` is an experiment directory (``chipo.train.experiment_dir``): one judge process per tag at
    a time, ``overwrite=true`` clears it first; a judge whose identity changed judges the cells again (the stored
    results name their identity), so the key is replaced rather than refused.
    """
    from chipo.train.experiment_dir import open_experiment

    layout = Layout(stage.out_dir)
    identity = judge_identity(stage, judge_config)
    cells = generated_cells(layout)
    if not cells:
        from chipo.config import ConfigError

        raise ConfigError(f"no generated summaries under {layout.generations}: run the generate stage first")
    with open_experiment(layout.judgements(stage.tag), identity, overwrite=stage.overwrite, replace_key=True,
                         what="TL;DR judge stage",
                         legacy_key=lambda d: identity if only_cell_files(d) else None) as exp:
        todo = cells_to_judge(stage, layout, cells, identity)
        counts = {**_judge_cells(stage, judge_config, layout, identity, todo), "skipped": len(cells) - len(todo),
                  "cells": len(cells)}
        exp.finish({"cells": len(cells)})
    return counts


def cells_to_judge(stage: JudgeStageConfig, layout: Layout, cells, identity: dict) -> list[tuple[Cell, str]]:
    """(cell, SHA-256 of its samples) of every cell without a result for these samples and this judge."""
    todo = []
    for cell, _ in cells:
        samples, _ = layout.generation(cell)
        result_path, _ = layout.judgement(stage.tag, cell)
        old = read_json(result_path)
        sha = _sha256(samples)
        if (old is not None and not stage.rejudge and old.get("generations_sha256") == sha
                and old.get("identity") == identity and old.get("errors") == 0):
            continue
        todo.append((cell, sha))
    return todo


def _judge_cells(stage: JudgeStageConfig, judge_config, layout: Layout, identity: dict, todo: list) -> dict:
    from chipo.judges import build_judge

    flagged = 0
    if todo:
        judge = build_judge(stage.judge, judge_config)
        client = getattr(judge, "client", None)
        try:
            for i, (cell, sha) in enumerate(todo, 1):
                result = judge_cell(stage, layout, judge, client, cell, sha, identity)
                flagged += result["flagged"]
                logger.info("judge %d/%d: %s win rate %s (%d malformed, %d errors)", i, len(todo), cell.name,
                            result["win_rate"], result["malformed"], result["errors"])
        finally:
            if hasattr(judge, "close"):
                judge.close()
    return {"judged": len(todo), "flagged": flagged}


def judge_cell(stage: JudgeStageConfig, layout: Layout, judge, client, cell: Cell, sha: str, identity: dict) -> dict:
    """Judge one cell's summaries (a) against the references (b); write details, then the result."""
    samples, _ = layout.generation(cell)
    rows = read_jsonl(samples)
    prefix = stage.response_prefix
    start, requests = time.perf_counter(), getattr(client, "requests", 0)
    verdicts = judge.judge([r["prompt"] for r in rows], [prefix + r["completion"].strip() for r in rows],
                           [prefix + r["reference"].strip() for r in rows])
    summary = verdicts.summary()
    invalid = (summary["n"] - summary["valid"]) / max(summary["n"], 1)
    result = {**cell.as_dict(), "judge": judge.name, "identity": identity, "generations_sha256": sha,
              "win_rate": summary.pop("win_rate_a"), **summary, "invalid_frac": invalid,
              "flagged": invalid > stage.max_invalid_frac,
              "requests": getattr(client, "requests", 0) - requests, "seconds": time.perf_counter() - start}
    result_path, details_path = layout.judgement(stage.tag, cell)
    write_jsonl(details_path, [{"index": r["index"], "outcome": o, "status": s, "raw": raw}
                               for r, o, s, raw in zip(rows, verdicts.outcomes, verdicts.status, verdicts.raw)])
    write_json(result_path, result)  # written last: its presence says the cell is judged
    return result
