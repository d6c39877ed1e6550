"""Figures for a lock run: lock curves per epoch and the held-out similarity heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analoglock.reports.html import write_report


def lock_curves(
    history: list[dict[str, float]], thresholds: dict[str, float] | None = None
) -> go.Figure:
    """Validation top-1, equivariance error and map drift by epoch, with the lock epochs marked."""
    fig = make_subplots(
        rows=1, cols=3, subplot_titles=("val top-1", "val equivariance error", "map drift (log)")
    )
    epochs = [h["epoch"] for h in history]
    for col, key in enumerate(("top1", "equivariance", "drift"), start=1):
        ys = [h[key] if h[key] != float("inf") else None for h in history]
        fig.add_trace(go.Scatter(x=epochs, y=ys, mode="lines+markers", name=key), row=1, col=col)
        locked = [e for e, h in zip(epochs, history, strict=True) if h.get("locked")]
        if locked:
            fig.add_trace(
                go.Scatter(
                    x=locked,
                    y=[h[key] for h in history if h.get("locked")],
                    mode="markers",
                    marker={"symbol": "star", "size": 12},
                    name=f"{key} (locked)",
                ),
                row=1,
                col=col,
            )
    fig.update_yaxes(type="log", row=1, col=3)
    fig.update_layout(height=380, showlegend=False)
    return fig


def similarity_heatmap(mapped: torch.Tensor, b: torch.Tensor, labels: list[str]) -> go.Figure:
    """Cosine of every mapped A row with every B row; the true partners are on the diagonal."""
    sim = torch.nn.functional.normalize(mapped, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    fig = go.Figure(go.Heatmap(z=sim.numpy(), x=labels, y=labels, colorscale="RdBu", zmid=0))
    fig.update_layout(height=600, xaxis_title="B (held out)", yaxis_title="M(A) (held out)")
    return fig


def comparison_bars(metrics: dict[str, Any]) -> go.Figure:
    """Held-out top-1 of the learned map beside every control and baseline."""
    names = ["learned", "shuffled_control", "meandiff", "procrustes", "identity"]
    vals = [
        metrics["heldout_top1"],
        metrics["shuffled_control_top1"],
        metrics["meandiff_top1"],
        metrics["procrustes_top1"],
        metrics["identity_top1"],
    ]
    fig = go.Figure(go.Bar(x=names, y=[v if v is not None else 0 for v in vals]))
    fig.update_layout(height=350, yaxis_title="held-out top-1 retrieval")
    return fig


def lock_report(
    metrics: dict[str, Any], mapped: torch.Tensor, b: torch.Tensor, view: list[str], out_dir: Path
) -> dict[str, go.Figure]:
    """Write out_dir/report.html and return its figures (for wandb)."""
    story = torch.tensor([v == "story" for v in view])
    figures = {
        "lock_curves": lock_curves(metrics["history"]),
        "heldout_top1_vs_controls": comparison_bars(metrics),
        "similarity_heatmap_stories": similarity_heatmap(
            mapped[story], b[story], [f"s{i}" for i in range(int(story.sum()))]
        ),
    }
    table = {
        k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str)) or v is None
    }
    write_report(
        Path(out_dir) / "report.html",
        f"analoglock lock run: {metrics.get('hook')}",
        figures,
        {"metrics": table},
    )
    return figures
