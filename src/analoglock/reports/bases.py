"""Figures for comparing two bases: matched cosines and the few -> many decomposition, with controls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch

from analoglock.reports.html import write_report


def overlay_histogram(title: str, series: dict[str, list[float]], x_title: str) -> go.Figure:
    """Overlaid normalised histograms, e.g. a measured distribution beside its control."""
    fig = go.Figure()
    for name, values in series.items():
        fig.add_trace(go.Histogram(x=values, name=name, opacity=0.6, histnorm="probability"))
    fig.update_layout(barmode="overlay", title=title, xaxis_title=x_title, height=360)
    return fig


def decomposition_heatmap(
    coefs: torch.Tensor, children: dict[str, list], max_rows: int = 64
) -> go.Figure:
    """Coefficients of the many-features built from the few, grouped by their strongest parent."""
    rows = [j for kids in children.values() for j, _ in kids][:max_rows]
    parents = sorted({int(p) for p in children})
    z = coefs[rows][:, parents].tolist() if rows and parents else [[0.0]]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"few {p}" for p in parents],
            y=[f"many {j}" for j in rows],
            colorscale="RdBu",
            zmid=0,
        )
    )
    fig.update_layout(
        title="each many-feature as a combination of the few", height=max(360, 14 * len(rows))
    )
    return fig


def compare_report(result: dict[str, Any], path: str | Path, title: str) -> dict[str, go.Figure]:
    """Write the comparison page; returns its figures (for wandb)."""
    dec = result["_tensors"]
    control_cos = result.get("_control_cosines", [])
    figures = {
        "matched |cosine| (Hungarian) vs random directions": overlay_histogram(
            "one-to-one matching",
            {"matched": [abs(c) for c in result["matched_cosines"]], "random control": control_cos},
            "|cosine|",
        ),
        "how well the few explain each of the many": overlay_histogram(
            "cosine(feature, its sparse reconstruction from the few)",
            {
                "features": dec["explained"].tolist(),
                "random directions": dec["explained_control"].tolist(),
            },
            "explained cosine",
        ),
        "decomposition": decomposition_heatmap(dec["coefs"], result["decomposition"]["children"]),
    }
    tables = {
        "matching": result["matching"],
        "matching, random control": result["matching_random_control"],
        "decomposition": {k: v for k, v in result["decomposition"].items() if k != "children"},
    }
    write_report(path, title, figures, tables)
    return figures
