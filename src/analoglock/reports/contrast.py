"""steer.html for contrast vectors: aggregators side by side, their random nulls, the generations.

Reads a `steer_contrast` report (plain JSON) and draws the validation sweep (each measure against
the scale, a line per aggregator), the test arms with bootstrap 95% intervals, each aggregator's
value beside the random directions drawn at its norm, a numbers table (with the empirical
p-values and the paired differences against the mean difference) and the generations side by
side. One colour per aggregator or arm in every panel (`ARM_COLOURS`), as steer.html does for
the lock. Knows nothing of models or hooks.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analoglock.reports.steering import fmt, html_table, write_page

ARM_COLOURS = {
    "unsteered": "#7f7f7f",
    "meandiff": "#2ca02c",  # the lock's steer.html gives the mean difference this colour too
    "pca": "#d62728",
    "probe": "#8c564b",
    "random": "#9467bd",
}
ARM_LABELS = {
    "unsteered": "unsteered",
    "meandiff": "mean difference",
    "pca": "first PC of paired differences",
    "probe": "logistic probe",
    "random": "random directions (covariance)",
}
POSITION_DASH = {"prompt": "dash", "new": "dot", "all": "solid"}
PANELS = {  # measure: (title, reference line, selection limit drawn in red)
    "concept_shift": ("concept shift (probe P(+), steered - unsteered)", 0.0, None),
    "concept_score": ("probe P(+) of the continuation", None, None),
    "judge_shift": ("judge shift toward +", 0.0, None),
    "fluency_ratio": ("fluency (perplexity ratio)", 1.0, "max_fluency_ratio"),
    "diversity_ratio": ("diversity (distinct-2 ratio)", 1.0, "min_diversity_ratio"),
    "loop_rate": ("loop rate (4-gram x3)", None, None),
    "neutral_kl": ("neutral-prompt KL", 0.0, None),
}
COLS = 4


def colour(arm: str) -> str:
    """The arm's colour in every panel (random_0_07 is a random direction)."""
    return ARM_COLOURS.get("random" if arm.startswith("random") else arm, "#000000")


def label(arm: str) -> str:
    """The arm's legend label."""
    return ARM_LABELS.get(arm, arm)


def _measures(report: Mapping[str, Any]) -> list[str]:
    """The report's measures that have a panel, in panel order."""
    have = set(report.get("measures", PANELS))
    return [m for m in PANELS if m in have]


def _subplots(measures: Sequence[str], titles: Sequence[str] | None = None) -> go.Figure:
    """A grid of COLS panels per row, one per measure."""
    rows = max(1, math.ceil(len(measures) / COLS))
    return make_subplots(
        rows=rows, cols=COLS, subplot_titles=list(titles or [PANELS[m][0] for m in measures])
    )


def _where(k: int) -> dict[str, int]:
    """The row and column of panel k."""
    return {"row": k // COLS + 1, "col": k % COLS + 1}


def _reference(fig: go.Figure, report: Mapping[str, Any], measure: str, k: int) -> None:
    """Grey line at the no-effect value; red dotted line at a selection limit."""
    _, ref, limit = PANELS[measure]
    if ref is not None:
        fig.add_hline(y=ref, line_color="grey", line_width=1, **_where(k))
    if limit is not None:
        value = report.get("selection", {}).get("criterion", {}).get(limit)
        if value is not None:
            fig.add_hline(y=value, line_color="red", line_dash="dot", line_width=1, **_where(k))


def sweep_figure(report: Mapping[str, Any]) -> go.Figure:
    """Validation: each measure against the scale, a line per (aggregator, positions); each
    aggregator's chosen setting starred in its colour."""
    measures = _measures(report)
    fig = _subplots(measures)
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in report.get("sweep", []):
        groups.setdefault((r["aggregator"], r["positions"]), []).append(r)
    chosen = report.get("selection", {}).get("chosen", {})
    for k, m in enumerate(measures):
        for (agg, positions), members in groups.items():
            members = sorted(members, key=lambda r: r["scale"])
            fig.add_trace(
                go.Scatter(
                    x=[r["scale"] for r in members],
                    y=[r.get(m) for r in members],
                    mode="lines+markers",
                    name=f"{label(agg)} @ {positions}",
                    legendgroup=agg,
                    showlegend=k == 0,
                    line={"color": colour(agg), "dash": POSITION_DASH.get(positions, "solid")},
                ),
                **_where(k),
            )
        for agg, pick in chosen.items():
            fig.add_trace(
                go.Scatter(
                    x=[pick["scale"]],
                    y=[pick.get(m)],
                    mode="markers",
                    marker={"symbol": "star", "size": 14, "color": colour(agg)},
                    name=f"chosen: {label(agg)}",
                    legendgroup=agg,
                    showlegend=k == 0,
                ),
                **_where(k),
            )
        _reference(fig, report, m, k)
    fig.update_xaxes(title_text="scale")
    n = report.get("selection", {}).get("n_prompts")
    fig.update_layout(
        height=330 * math.ceil(len(measures) / COLS),
        title=f"Validation sweep (n = {n} prompts): x + scale v, every v at the mean difference's "
        "norm; stars: each aggregator's choice",
    )
    return fig


def arms_figure(report: Mapping[str, Any]) -> go.Figure:
    """Test: each measure per arm, bars with bootstrap intervals, in the arms' colours."""
    measures = _measures(report)
    summary = report["test"]["summary"]
    fig = _subplots(measures)
    for k, m in enumerate(measures):
        for arm, cells in summary["arms"].items():
            c = cells[m]
            v, lo, hi = c["value"], c["lo"], c["hi"]
            err = (
                {"type": "data", "symmetric": False, "array": [hi - v], "arrayminus": [v - lo]}
                if None not in (v, lo, hi)
                else None
            )
            fig.add_trace(
                go.Bar(
                    x=[label(arm)],
                    y=[v],
                    error_y=err,
                    marker_color=colour(arm),
                    name=label(arm),
                    legendgroup=arm,
                    showlegend=k == 0,
                    hovertemplate=f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]<extra>{arm}</extra>",
                ),
                **_where(k),
            )
        _reference(fig, report, m, k)
    fig.update_xaxes(showticklabels=False)
    test = report["test"]
    fig.update_layout(
        height=330 * math.ceil(len(measures) / COLS),
        title=f"Test ({test['split']}): n = {test['n_prompts']} prompts, {test['n_neutral']} "
        f"neutral prompts; bars are means, whiskers bootstrap {summary['level']:.0%} intervals",
    )
    return fig


def random_figure(report: Mapping[str, Any]) -> go.Figure:
    """Per measure: for each aggregator, the random directions at its norm (box and points) and
    its own value (a diamond in its colour)."""
    measures = _measures(report)
    rnd = report["test"]["random"]
    fig = _subplots(measures)
    for k, m in enumerate(measures):
        for j, (agg, cell) in enumerate(rnd.items()):
            fig.add_trace(
                go.Box(
                    x=[label(agg)] * len(cell["values"][m]),
                    y=cell["values"][m],
                    boxpoints="all",
                    jitter=0.4,
                    marker_color=colour("random"),
                    name=label("random"),
                    legendgroup="random",
                    showlegend=k == 0 and j == 0,
                ),
                **_where(k),
            )
            fig.add_trace(
                go.Scatter(
                    x=[label(agg)],
                    y=[cell["observed"][m]],
                    mode="markers",
                    marker={"symbol": "diamond", "size": 13, "color": colour(agg)},
                    name=label(agg),
                    legendgroup=agg,
                    showlegend=k == 0,
                    hovertemplate=f"p = {fmt(cell['p_values'][m], 2)}<extra>{agg}</extra>",
                ),
                **_where(k),
            )
        _reference(fig, report, m, k)
    n = next(iter(rnd.values()))["n"] if rnd else 0
    fig.update_layout(
        height=330 * math.ceil(len(measures) / COLS),
        title=f"{n} random directions from the activations' covariance at each aggregator's norm "
        "(diamonds: the aggregator)",
    )
    return fig


def numbers_table(report: Mapping[str, Any]) -> str:
    """Test numbers per arm (value [lo, hi]), the p-values against the random directions, and
    the paired differences against the mean difference."""
    measures = _measures(report)
    test = report["test"]
    rows = [
        [label(arm)]
        + [
            f"{fmt(c[m]['value'])} [{fmt(c[m]['lo'])}, {fmt(c[m]['hi'])}]" for m in measures
        ]  # fmt: skip
        for arm, c in test["summary"]["arms"].items()
    ]
    for agg, cell in test["random"].items():
        rows.append(
            [f"{label(agg)}: p vs {cell['n']} random"]
            + [fmt(cell["p_values"].get(m), 2) for m in measures]
        )
    for name, cells in test["summary"].get("paired", {}).items():
        rows.append(
            [name]
            + [
                f"{fmt(cells[m]['diff'])} [{fmt(cells[m]['lo'])}, {fmt(cells[m]['hi'])}]"
                if m in cells
                else ""
                for m in measures
            ]
        )
    return html_table(["arm", *measures], rows)


def generations_table(report: Mapping[str, Any]) -> str:
    """One row per test prompt: the prompt, then each arm's continuation under its colour."""
    gens = report.get("generations", [])
    arms = [a for a in ["unsteered", *report.get("aggregators", []), "random"] if any(a in g for g in gens)]  # fmt: skip
    head = "<th>prompt</th>" + "".join(
        f"<th style='border-bottom:4px solid {colour(a)}'>{html.escape(label(a))}</th>"
        for a in arms
    )
    body = "".join(
        f"<tr><td>{html.escape(g['prompt'])}</td>"
        + "".join(f"<td>{html.escape(str(g.get(a) or ''))}</td>" for a in arms)
        + "</tr>"
        for g in gens
    )
    return f"<table class='gens'><tr>{head}</tr>{body}</table>"


def contrast_figures(report: Mapping[str, Any]) -> dict[str, go.Figure]:
    """The report's figures by name (the same ones go to wandb)."""
    figs = {"test arms": arms_figure(report), "random directions": random_figure(report)}
    if report.get("sweep"):
        figs["validation sweep"] = sweep_figure(report)
    return figs


def write_contrast_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write steer.html for a contrast run and return its path."""
    src, probe = report["source"], report["probe"]
    chosen = report["selection"]["chosen"]
    title = f"Steering toward {src['direction']} ({src['spec']}) at {', '.join(report['hooks'])}"
    intro = (
        f"Vectors from {src['splits']['train']} train pairs, each text read at its "
        f"{report['read']} token(s). Concept effect: a logistic probe at {probe['hook']} (held-out "
        f"accuracy {fmt(probe['heldout_accuracy'])} on {probe['n_heldout']} items, chance 0.5) "
        "scores each continuation, re-read by the unsteered model. Chosen on validation: "
        + "; ".join(
            f"{label(a)} scale {fmt(c['scale'])} at {c['positions']}"
            + ("" if c.get("constraint_met", True) else " (no scale met the limits)")
            for a, c in chosen.items()
        )
        + "."
    )
    return write_page(
        path, title, intro, numbers_table(report), contrast_figures(report),
        generations_table(report), "Generations (test)",
    )  # fmt: skip


def plot_contrast(report: Mapping[str, Any], path_html: str | Path) -> dict[str, go.Figure]:
    """Write steer.html and return its figures (for wandb)."""
    write_contrast_report(report, path_html)
    return contrast_figures(report)


__all__ = [
    "ARM_COLOURS",
    "arms_figure",
    "contrast_figures",
    "generations_table",
    "numbers_table",
    "plot_contrast",
    "random_figure",
    "sweep_figure",
    "write_contrast_report",
]
