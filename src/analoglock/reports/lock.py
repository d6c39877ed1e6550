"""Figures for a lock run: what the lock is judged on, per epoch and on held-out test pairs.

One colour per map across every panel (learned, each baseline, the shuffled control), the
criterion's thresholds drawn, intervals as error bars, numbers rounded to what they can carry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analoglock.reports.html import write_report

COLOURS = {
    "learned": "#d62728",
    "identity": "#7f7f7f",
    "meandiff": "#1f77b4",
    "procrustes": "#2ca02c",
    "ridge": "#9467bd",
    "shuffled_control": "#ff7f0e",
}
BASELINE_NAMES = ("identity", "meandiff", "procrustes", "ridge")


def _colour(name: str) -> str:
    return COLOURS.get(name, "#17becf")


def lock_curves(history: list[dict[str, Any]], views=("story", "roles")) -> go.Figure:
    """Per epoch: the lower end of each paired margin (must be > 0 to lock), relation error
    margin vs identity (upper end must be < 0), drift with its threshold, locked epochs marked."""
    titles = [f"top-1 margin, {v}: lower 95% bound" for v in views]
    titles += ["relation error vs identity: upper bound", "map drift (log)"]
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles)
    epochs = [h["epoch"] for h in history]
    for col, v in enumerate(views, start=1):
        for name in BASELINE_NAMES:
            key = f"top1_{v}_vs_{name}"
            ys = [h["margins"].get(key, [None] * 3)[1] for h in history]
            if any(y is not None for y in ys):
                fig.add_trace(
                    go.Scatter(x=epochs, y=ys, mode="lines", name=f"vs {name}",
                               line={"color": _colour(name)}, legendgroup=name,
                               showlegend=col == 1),
                    row=1, col=col,
                )  # fmt: skip
        fig.add_hline(y=0, line_dash="dash", line_color="black", row=1, col=col)
    col = len(views) + 1
    for v in views:
        ys = [h["margins"].get(f"rel_err_{v}_vs_identity", [None] * 3)[2] for h in history]
        if all(y is None for y in ys):
            continue  # within-pair assignment has no relation error
        fig.add_trace(
            go.Scatter(x=epochs, y=ys, mode="lines", name=f"rel. error {v}", showlegend=True),
            row=1, col=col,
        )  # fmt: skip
    fig.add_hline(y=0, line_dash="dash", line_color="black", row=1, col=col)
    drift = [h.get("drift") for h in history]
    fig.add_trace(
        go.Scatter(x=epochs, y=drift, mode="lines+markers", name="drift", showlegend=False),
        row=1, col=col + 1,
    )  # fmt: skip
    locked = [h["epoch"] for h in history if h.get("locked")]
    for e in locked[:1]:
        for c in range(1, col + 2):
            fig.add_vline(x=e, line_color="#d62728", line_dash="dot", row=1, col=c)
    fig.update_yaxes(type="log", row=1, col=col + 1)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(height=400, legend={"orientation": "h", "y": -0.25})
    return fig


def test_bars(
    summary: dict[str, dict[str, float]], intervals: dict[str, dict[str, list[float]]] | None = None
) -> go.Figure:
    """Held-out test top-1 (story, roles) and role MRR per map; error bars where given."""
    keys = [("top1_story", "top-1, stories"), ("top1_roles", "top-1, roles"),
            ("mrr_roles", "MRR, roles"), ("top1_assign", "top-1, role within its own story")]  # fmt: skip
    keys = [k for k in keys if any(k[0] in d for d in summary.values())]
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[t for _, t in keys])
    for col, (key, _) in enumerate(keys, start=1):
        names = [n for n in summary if key in summary[n]]
        ys = [summary[n][key] for n in names]
        err = None
        if intervals:
            lo = [summary[n][key] - intervals.get(n, {}).get(key, [0, ys[i], ys[i]])[1]
                  for i, n in enumerate(names)]  # fmt: skip
            hi = [intervals.get(n, {}).get(key, [0, ys[i], ys[i]])[2] - summary[n][key]
                  for i, n in enumerate(names)]  # fmt: skip
            err = {"type": "data", "array": hi, "arrayminus": lo}
        fig.add_trace(
            go.Bar(x=names, y=ys, marker_color=[_colour(n) for n in names], error_y=err,
                   text=[f"{y:.2f}" for y in ys], textposition="outside", showlegend=False),
            row=1, col=col,
        )  # fmt: skip
        group = key.split("_")[1]
        n_items = next((summary[n].get("n_" + group) for n in names), None)
        chance = next((summary[n].get("chance_" + group) for n in names), None)
        if chance is None and n_items:
            chance = 1 / n_items
        if chance:
            fig.add_hline(y=chance, line_dash="dot", line_color="grey", row=1, col=col)
    fig.update_layout(height=420, title="held-out test pairs (dotted: chance)")
    return fig


def similarity_heatmap(mapped: torch.Tensor, b: torch.Tensor, labels: list[str]) -> go.Figure:
    """Cosine of every mapped A row with every B row; the true partners are on the diagonal."""
    sim = torch.nn.functional.normalize(mapped, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    fig = go.Figure(go.Heatmap(z=sim.numpy(), x=labels, y=labels, colorscale="RdBu", zmid=0))
    fig.update_layout(height=600, xaxis_title="B (held out)", yaxis_title="M(A) (held out)")
    return fig


def _round(v: Any) -> Any:
    return round(v, 3) if isinstance(v, float) else v


def lock_report(
    metrics: dict[str, Any], out_dir: str | Path, mapped=None, b=None
) -> dict[str, go.Figure]:
    """Write out_dir/report.html and return its figures (for wandb)."""
    figures = {
        "lock criterion per epoch (validation)": lock_curves(
            metrics["history"], views=("story", "roles", "assign")
        ),
        "held-out test": test_bars(metrics["test"]),
    }
    if mapped is not None and b is not None:
        figures["similarity, test stories"] = similarity_heatmap(
            mapped, b, [f"s{i}" for i in range(len(b))]
        )
    head = {k: _round(metrics[k]) for k in ("locked", "lock_epoch", "epochs_run", "mapper", "hook",
                                            "seed", "shuffled_control_locked") if k in metrics}  # fmt: skip
    head["not applicable"] = ", ".join(metrics.get("not_applicable", [])) or "-"
    head["pairs (train/val/test)"] = "/".join(str(v) for v in metrics["n_pairs"].values())
    margins = {
        k: "{:+.3f} [{:+.3f}, {:+.3f}]".format(*v) for k, v in metrics["test_margins"].items()
    }
    write_report(
        Path(out_dir) / "report.html",
        f"analoglock lock run: {metrics.get('mapper')} at {metrics.get('hook')}",
        figures,
        {"run": head, "test margins: learned - baseline, mean [95% paired bootstrap]": margins},
    )
    return figures
