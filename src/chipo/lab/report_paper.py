"""The demo's paper-specific part of the report: Table 1 of Huang et al. 2024 (arXiv 2407.13399) and its claims.

Table 1 of the paper lists, per beta and number of epochs, "chiPO vs DPO" win rates (percent). The paper's claims
checked here, each by a verdict of ``chipo.lab.verdicts`` in the report's one Holm family:

* DPO's win rate falls with more epochs and chiPO's does not (the generic report's falls, from the paper's
  epochs 1/2/4 to the last);
* chiPO beats DPO at the last epoch (the generic report's last-epoch gap);
* the chiPO - DPO gap is larger at the smaller beta (``verdicts.interaction``);
* at the smaller beta, the gap grows with training (``verdicts.trend``).

Only the demo uses this module; ``chipo lab report`` stays generic over the sweep's methods.
"""

from __future__ import annotations

import math

import pandas as pd

from chipo.lab import tables, verdicts
from chipo.lab.report import Extra
from chipo.lab.report_monitor import when_to_stop_lines
from chipo.lab.report_tables import fmt
from chipo.markdown import markdown_table

A, B = "chipo", "dpo"
NAMES = {"chipo": "chiPO", "dpo": "DPO"}
WIN_LABEL = "gold win rate vs pi_ref"


def table1(df: pd.DataFrame, keys: dict) -> str:
    """Rows beta, columns epochs, cells 'chiPO vs DPO' mean win rates in percent (the paper's Table 1 layout)."""
    es = tables.epochs(df)

    def cell(beta: float, e: int) -> str:
        a, _ = tables.mean_and_se(tables.at_epoch(df, A, beta, keys["win"], e))
        b, _ = tables.mean_and_se(tables.at_epoch(df, B, beta, keys["win"], e))
        return f"{fmt(a, scale=100)} vs {fmt(b, scale=100)}"

    head = ["beta"] + [f"epochs {e} (chiPO vs DPO)" if i == 0 else f"{e}" for i, e in enumerate(es)]
    return markdown_table(head, ([f"{beta:g}", *(cell(beta, e) for e in es)] for beta in tables.betas(df)))


def paper_claims(df: pd.DataFrame, keys: dict) -> list[verdicts.Claim]:
    """The claims the generic family lacks: the beta interaction and the trend of the gap at the smaller beta."""
    names, betas, es = tables.methods(df), tables.betas(df), tables.epochs(df)
    if not {A, B} <= set(names) or not es:
        return []
    out = []
    if len(betas) > 1:
        out.append(verdicts.interaction(df, A, B, betas[-1], betas[0], keys["win"], es[-1], WIN_LABEL))
    if len(es) > 1:
        out.append(verdicts.trend(df, A, B, betas[-1], keys["win"], WIN_LABEL))
    return out


def paper_plan(methods: list[str], betas: list[float], epochs: list[int]) -> list[str]:
    """``paper_claims`` described from the design alone (see ``verdicts.planned_claims``)."""
    if not {A, B} <= set(methods) or not epochs:
        return []
    betas = sorted(betas, reverse=True)
    out = []
    if len(betas) > 1:
        out.append(f"{A} - {B} in {WIN_LABEL} at epoch {max(epochs)} larger at beta {betas[-1]:g} than at "
                   f"{betas[0]:g} (one-sided)")
    if len(epochs) > 1:
        out.append(f"{A} - {B} gap in {WIN_LABEL} grows with training, beta {betas[-1]:g} (one-sided; slope on "
                   "log epoch)")
    return out


def _find(claims: list[verdicts.Claim], prefix: str, beta: float | None = None) -> verdicts.Claim | None:
    return next((c for c in claims if c.verdict.claim.startswith(prefix)
                 and (beta is None or c.verdict.claim.endswith(f"beta {beta:g}"))), None)


def _line(claim: verdicts.Claim | None, what: str) -> str:
    if claim is None:
        return f"- {what}: not tested (this sweep lacks what it needs)."
    v = claim.verdict
    p = "n/a" if math.isnan(v.p_adjusted) else f"{v.p_adjusted:.3f}"
    return f"- {what}: **{v.word()}** (estimate {v.estimate * claim.scale:+.3g} {claim.unit}, Holm p {p})."


def paper_sections(df: pd.DataFrame, keys: dict, claims: list[verdicts.Claim]) -> list[str]:
    if not {A, B} <= set(tables.methods(df)):
        return []
    es, betas = tables.epochs(df), tables.betas(df)
    n = len(tables.seeds(df))
    out = ["## Result in the layout of the paper's Table 1", "",
           f"Gold win rate against pi_ref, percent, mean over {n} seed(s): chiPO vs DPO (Huang et al. 2024, "
           "arXiv 2407.13399, Table 1, reports the same layout on TL;DR summarization).", "", table1(df, keys), "",
           "## The paper's claims on these numbers", "",
           "Each line is one test of the Verdicts section below (same Holm family); 'not shown' means the test "
           "did not pass, not that the opposite holds.", ""]
    last = es[-1]
    early = "/".join(str(e) for e in verdicts.PAPER_EPOCHS if e in es and e < last) or "none"
    for beta in betas:
        out.append(_line(_find(claims, f"{B}: {WIN_LABEL} falls", beta),
                         f"beta {beta:g}: DPO's win rate falls from epochs {early} (the paper's 1/2/4 that were "
                         f"evaluated before the last) to epoch {last}"))
        out.append(_line(_find(claims, f"{A}: {WIN_LABEL} falls", beta),
                         f"beta {beta:g}: chiPO's win rate falls likewise (the paper says it does not)"))
        out.append(_line(_find(claims, f"{A} vs {B}: {WIN_LABEL} at epoch {last}", beta),
                         f"beta {beta:g}: chiPO and DPO differ at epoch {last}"))
    if len(betas) > 1:
        out.append(_line(_find(claims, f"{A} - {B} in {WIN_LABEL}"),
                         f"the chiPO - DPO gap at epoch {last} is larger at beta {betas[-1]:g} than at {betas[0]:g}"))
    out.append(_line(_find(claims, f"{A} - {B} gap in {WIN_LABEL} grows"),
                     f"at beta {betas[-1]:g} the chiPO - DPO gap grows with training"))
    when = when_to_stop_lines(df, keys)
    return out + ([""] + when if when else [])


PAPER = Extra(claims=paper_claims, sections=paper_sections, plan=paper_plan)
