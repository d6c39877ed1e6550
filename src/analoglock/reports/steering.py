"""steer.html: every steering measure per arm, the random-direction nulls, and the generations.

Reads a `run_steering` report (plain JSON) and draws: the validation sweep (each measure against
the norm of the mean displacement, so alpha and scale share one axis), the test arms with
bootstrap 95% intervals, the random directions' distribution with the lock's value marked, and
the generations side by side (prompt, unsteered, lock, mean difference, the data's workplace
analogue). One colour per arm in every panel (`ARM_COLOURS`). Knows nothing of models or hooks.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analoglock.atomic import write_text

ARM_COLOURS = {
    "unsteered": "#7f7f7f",
    "lock": "#1f77b4",
    "control_map": "#ff7f0e",
    "meandiff": "#2ca02c",
    "meandiff_best": "#17becf",
    "meandiff_norm": "#bcbd22",
    "random": "#9467bd",
    "asked": "#8c564b",
}
ARM_LABELS = {
    "unsteered": "unsteered",
    "lock": "lock map",
    "control_map": "shuffled-pairs map",
    "meandiff": "mean difference (fluency-matched)",
    "meandiff_best": "mean difference (best on validation)",
    "meandiff_norm": "mean difference (lock's norm)",
    "random": "random directions (covariance)",
    "asked": "asked to retell (no steering)",
}
POSITION_DASH = {"roles": "solid", "prompt": "dash", "new": "dot", "all": "dashdot"}
PANELS = {  # measure: (title, reference line, what the line is)
    "judge_shift": ("judge shift toward B", 0.0, None),
    "analogue_top1": ("analogue top-1", None, "chance"),
    "analogue_mrr": ("analogue MRR", None, "chance"),
    "role_mrr": ("role-transfer MRR", None, "chance"),
    "fluency_ratio": ("fluency (perplexity ratio)", 1.0, "max_fluency_ratio"),
    "diversity_ratio": ("diversity (distinct-2 ratio)", 1.0, "min_diversity_ratio"),
    "loop_rate": ("loop rate (4-gram x3)", None, None),
    "neutral_kl": ("neutral-prompt KL", 0.0, None),
}


def colour(arm: str) -> str:
    """The arm's colour in every panel (random_07 is a random direction)."""
    return ARM_COLOURS.get("random" if arm.startswith("random") else arm, "#000000")


def fmt(x: Any, digits: int = 3) -> str:
    """A number to `digits` significant digits ("n/a" for None or NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _grid(n: int, cols: int) -> tuple[int, int]:
    """Rows and columns for n panels."""
    return max(1, math.ceil(n / cols)), cols


def _hlines(fig: go.Figure, report: Mapping[str, Any], measure: str, row: int, col: int) -> None:
    """Reference lines: 0 or 1, chance, and the selection constraints."""
    _, ref, extra = PANELS[measure]
    if ref is not None:
        fig.add_hline(y=ref, line_color="grey", line_width=1, row=row, col=col)
    if extra == "chance":
        chance = report.get("test", {}).get("chance", {}).get(measure)
        if chance is not None:
            fig.add_hline(y=chance, line_color="grey", line_dash="dot", row=row, col=col)
    elif extra is not None:
        limit = report.get("selection", {}).get("criterion", {}).get(extra)
        if limit is not None:
            fig.add_hline(
                y=limit, line_color="red", line_dash="dot", line_width=1, row=row, col=col
            )


def sweep_figure(report: Mapping[str, Any]) -> go.Figure:
    """Validation: each measure vs the norm of the mean displacement, a line per (arm, positions);
    the chosen settings starred in their test arm's colour."""
    rows = report.get("sweep", [])
    measures = list(PANELS)
    n_rows, n_cols = _grid(len(measures), 4)
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=[PANELS[m][0] for m in measures])
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["positions"]), []).append(r)
    chosen = report.get("selection", {})
    for k, measure in enumerate(measures):
        row, col = k // n_cols + 1, k % n_cols + 1
        for (arm, positions), members in groups.items():
            members = sorted(members, key=lambda r: r["norm"])
            strength = "alpha" if arm == "lock" else "scale"
            name = f"{ARM_LABELS.get(arm, arm)} @ {positions}"
            fig.add_trace(
                go.Scatter(
                    x=[r["norm"] for r in members],
                    y=[r.get(measure) for r in members],
                    mode="lines+markers",
                    name=name,
                    legendgroup=f"{arm} @ {positions}",
                    showlegend=k == 0,
                    line={"color": colour(arm), "dash": POSITION_DASH.get(positions, "solid")},
                    text=[f"{strength}={fmt(r[strength])}" for r in members],
                    hovertemplate="%{text}<br>norm %{x:.3g}<br>%{y:.3g}<extra>" + name + "</extra>",
                ),
                row=row,
                col=col,
            )
        for arm in ("lock", "meandiff", "meandiff_best"):
            pick = chosen.get(arm)
            if not pick:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[pick["norm"]],
                    y=[pick.get(measure)],
                    mode="markers",
                    marker={"symbol": "star", "size": 14, "color": colour(arm)},
                    name=f"chosen: {ARM_LABELS[arm]}",
                    legendgroup=f"chosen {arm}",
                    showlegend=k == 0,
                ),
                row=row,
                col=col,
            )
        _hlines(fig, report, measure, row, col)
    fig.update_xaxes(title_text="norm of mean displacement")
    fig.update_layout(height=330 * n_rows, title="Validation sweep (selection split)")
    return fig


def arms_figure(report: Mapping[str, Any]) -> go.Figure:
    """Test: each measure per arm, bars with bootstrap intervals, in the arms' colours."""
    summary = report["test"]["summary"]
    arms = list(summary["arms"])
    measures = list(PANELS)
    n_rows, n_cols = _grid(len(measures), 4)
    n = {"prompt": summary.get("prompt"), "item": summary.get("item")}
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        subplot_titles=[PANELS[m][0] for m in measures],
    )
    for k, measure in enumerate(measures):
        row, col = k // n_cols + 1, k % n_cols + 1
        for arm in arms:
            cell = summary["arms"][arm][measure]
            v, lo, hi = cell["value"], cell["lo"], cell["hi"]
            err = (
                {"type": "data", "symmetric": False, "array": [hi - v], "arrayminus": [v - lo]}
                if None not in (v, lo, hi)
                else None
            )
            fig.add_trace(
                go.Bar(
                    x=[ARM_LABELS.get(arm, arm)],
                    y=[v],
                    error_y=err,
                    marker_color=colour(arm),
                    name=ARM_LABELS.get(arm, arm),
                    legendgroup=arm,
                    showlegend=k == 0,
                    hovertemplate=f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]<extra>{arm}</extra>",
                ),
                row=row,
                col=col,
            )
        _hlines(fig, report, measure, row, col)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(
        height=330 * n_rows,
        title=f"Test split: n = {n['prompt']} prompts, {n['item']} role items; bars are means "
        f"over prompts, whiskers bootstrap {summary['level']:.0%} intervals",
        barmode="group",
    )
    return fig


def random_figure(report: Mapping[str, Any]) -> go.Figure:
    """Per measure: the random directions' values (points and box), the lock's value as a line."""
    rnd = report["test"]["random"]
    measures = list(PANELS)
    n_rows, n_cols = _grid(len(measures), 4)
    titles = [f"{PANELS[m][0]} (p = {fmt(rnd['p_values'].get(m), 2)})" for m in measures]
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=titles)
    for k, measure in enumerate(measures):
        row, col = k // n_cols + 1, k % n_cols + 1
        fig.add_trace(
            go.Box(
                y=rnd["values"][measure],
                boxpoints="all",
                jitter=0.4,
                marker_color=colour("random"),
                name=ARM_LABELS["random"],
                legendgroup="random",
                showlegend=k == 0,
            ),
            row=row,
            col=col,
        )
        lock = rnd["lock"].get(measure)
        if lock is not None:
            fig.add_hline(y=lock, line_color=colour("lock"), line_width=3, row=row, col=col)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(
        height=330 * n_rows,
        title=f"{rnd['n']} random directions ({rnd['kind']}) at the lock's norm "
        f"{fmt(rnd['norm'])}; blue line: the lock",
    )
    return fig


def html_table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """An HTML table of escaped cells."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table class='{cls}'><tr>{th}</tr>{body}</table>"


def numbers_table(report: Mapping[str, Any]) -> str:
    """Test numbers per arm (value [lo, hi]), then the paired differences vs the mean difference."""
    summary = report["test"]["summary"]
    measures = list(PANELS)
    rows = []
    for arm, cells in summary["arms"].items():
        rows.append(
            [ARM_LABELS.get(arm, arm)]
            + [
                f"{fmt(c['value'])} [{fmt(c['lo'])}, {fmt(c['hi'])}]"
                for c in (cells[m] for m in measures)
            ]
        )
    out = html_table(["arm", *measures], rows, "numbers")
    paired = []
    for name, cells in summary.get("paired", {}).items():
        paired.append(
            [name]
            + [
                f"{fmt(cells[m]['diff'])} [{fmt(cells[m]['lo'])}, {fmt(cells[m]['hi'])}] "
                f"p={fmt(cells[m]['p_boot'], 2)}/{fmt(cells[m]['p_wilcoxon'], 2)}"
                for m in measures
            ]
        )
    if paired:
        out += "<p>Paired differences (bootstrap interval; p: bootstrap / Wilcoxon)</p>"
        out += html_table(["comparison", *measures], paired, "numbers")
    return out


GENERATION_COLUMNS = (
    "id", "prompt", "unsteered", "lock", "meandiff", "control_map", "asked", "analogue"
)  # fmt: skip


def generations_table(report: Mapping[str, Any]) -> str:
    """The generations side by side, one row per prompt, columns headed in the arms' colours."""
    gens = report.get("generations", [])
    cols = [c for c in GENERATION_COLUMNS if any(c in g for g in gens)]
    head = "".join(
        f"<th style='border-bottom:4px solid {colour(c)}'>"
        f"{html.escape(ARM_LABELS.get(c, 'workplace analogue (data)' if c == 'analogue' else c))}</th>"
        for c in cols
    )
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(g.get(c) or ''))}</td>" for c in cols) + "</tr>"
        for g in gens
    )
    return f"<table class='gens'><tr>{head}</tr>{body}</table>"


STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; }
table.gens td { width: 16%; }
"""


def steering_figures(report: Mapping[str, Any]) -> dict[str, go.Figure]:
    """The report's figures by name (the same ones go to wandb)."""
    figs = {"test arms": arms_figure(report), "random directions": random_figure(report)}
    if report.get("sweep"):
        figs["validation sweep"] = sweep_figure(report)
    return figs


def write_page(
    path: str | Path,
    title: str,
    intro: str,
    numbers_html: str,
    figures: Mapping[str, go.Figure],
    generations_html: str,
    generations_title: str = "Generations",
) -> Path:
    """A steering page: title, intro, the numbers table, the figures (plotly.js inlined once, so
    the page opens offline) and the generations, written atomically; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>",
        "<h2>Test numbers</h2>",
        numbers_html,
    ]
    for i, (name, fig) in enumerate(figures.items()):
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
    parts += [f"<h2>{html.escape(generations_title)}</h2>", generations_html, "</body></html>"]
    write_text(path, "\n".join(parts))
    return path


def write_steering_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write steer.html for a lock run and return its path."""
    sel = report.get("selection", {})
    lock = sel.get("lock", {})
    title = (
        f"Steering at {report.get('hook')} ({report.get('map_kind')} map, {report.get('dataset')})"
    )
    intro = (
        f"Chosen on {sel.get('split')} (n = {sel.get('n_prompts')}): lock alpha "
        f"{fmt(lock.get('alpha'))} at {lock.get('positions')} positions"
        f"{'' if lock.get('constraint_met', True) else ' (no setting met the constraints)'}; "
        f"mean difference scale {fmt(sel.get('meandiff', {}).get('scale'))} (fluency-matched), "
        f"{fmt(sel.get('meandiff_best', {}).get('scale'))} (best)."
    )
    return write_page(
        path, title, intro, numbers_table(report), steering_figures(report),
        generations_table(report),
    )  # fmt: skip


def plot_steering(report: Mapping[str, Any], path_html: str | Path) -> dict[str, go.Figure]:
    """Write steer.html and return its figures (for wandb)."""
    write_steering_report(report, path_html)
    return steering_figures(report)


__all__ = [
    "ARM_COLOURS",
    "arms_figure",
    "generations_table",
    "numbers_table",
    "plot_steering",
    "random_figure",
    "steering_figures",
    "sweep_figure",
    "write_steering_report",
]
