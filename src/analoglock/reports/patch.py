"""The patching report: effect heatmaps beside their controls, attribution vs exact, the feature graph.

Renders what `analoglock.patching` computed into one offline HTML page (via `reports.html`);
knows nothing of how effects are computed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from torch import Tensor

from analoglock.patching.exact import Effects
from analoglock.patching.run import PatchRun
from analoglock.reports.html import write_report

MAX_HEATMAP_ROWS = 60  # the upstream features with the largest total |effect|
REPORT_FILE = "report.html"  # beside the run's graph.json and effects.safetensors


def _heatmap(matrix: Tensor, rows: Tensor, cols: Tensor, title: str, zmax: float) -> go.Figure:
    """Diverging heatmap (upstream rows, downstream columns) on a shared colour scale."""
    fig = go.Figure(
        go.Heatmap(
            z=matrix.tolist(),
            x=[f"d{int(c)}" for c in cols],
            y=[f"u{int(r)}" for r in rows],
            colorscale="RdBu_r",  # red raises the downstream code, as in the network
            zmid=0.0,
            zmin=-zmax,
            zmax=zmax,
            colorbar={"title": "effect"},
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title="downstream feature",
        yaxis_title="upstream feature",
        height=min(1400, 160 + 16 * len(rows)),
        yaxis={"autorange": "reversed"},  # strongest upstream feature on top
    )
    return fig


def effect_figures(effects: dict[str, Effects]) -> dict[str, go.Figure]:
    """Heatmaps of each method's effects and controls (strongest upstream rows), same colour scale."""
    main = effects.get("exact") or effects["attribution"]
    order = main.effect.abs().sum(1).argsort(descending=True)[:MAX_HEATMAP_ROWS]
    zmax = float(main.effect[order].abs().max().clamp_min(1e-12))
    figs = {}
    for name, eff in effects.items():
        rows = eff.upstream[order]
        figs[f"{name} effects ({eff.intervention})"] = _heatmap(
            eff.effect[order], rows, eff.downstream, f"{name}: E[i, j]", zmax
        )
        if eff.control is not None:
            figs[f"{name} control (random direction, equal norm)"] = _heatmap(
                eff.control[order], rows, eff.downstream, f"{name}: control", zmax
            )
    return figs


def scatter_figure(exact: Effects, attribution: Effects, agreement: dict[str, Any]) -> go.Figure:
    """Attribution against exact over all pairs, with the y = x line and the Spearman in the title."""
    e, a = exact.effect.flatten(), attribution.effect.flatten()
    lim = float(torch.cat([e, a]).abs().max().clamp_min(1e-12))
    fig = go.Figure(
        [
            go.Scattergl(
                x=e.tolist(), y=a.tolist(), mode="markers", marker={"size": 3}, name="pairs"
            ),
            go.Scatter(
                x=[-lim, lim], y=[-lim, lim], mode="lines", name="y = x", line={"dash": "dash"}
            ),
        ]
    )
    fig.update_layout(
        title=f"attribution vs exact: Spearman {agreement.get('spearman', float('nan')):.3f}, "
        f"top-{agreement.get('topk')} overlap {agreement.get('topk_overlap', float('nan')):.2f}, "
        f"sign agreement {agreement.get('sign_agreement', float('nan')):.2f}",
        xaxis_title="exact effect",
        yaxis_title="attribution estimate",
        height=600,
    )
    return fig


def network_figure(graph: dict[str, Any], max_edges: int = 150) -> go.Figure:
    """Two-column network: upstream features left, downstream right, strongest edges drawn."""
    edges = graph["edges"][:max_edges]
    used = {e["source"] for e in edges} | {e["target"] for e in edges}
    nodes = [n for n in graph["nodes"] if n["id"] in used]
    pos = {}
    for side, x in (("upstream", 0.0), ("downstream", 1.0)):
        side_nodes = sorted((n for n in nodes if n["side"] == side), key=lambda n: -n["importance"])
        for k, n in enumerate(side_nodes):
            pos[n["id"]] = (x, -k)
    key = "effect" if any("effect" in e for e in edges) else "attribution"
    biggest = max((abs(e[key]) for e in edges), default=1.0) or 1.0
    traces: list[go.BaseTraceType] = []
    for e in edges:
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        traces.append(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                line={
                    "width": 0.5 + 6 * abs(e[key]) / biggest,
                    "color": "firebrick" if e[key] > 0 else "royalblue",
                },  # fmt: skip
                opacity=0.6,
                hoverinfo="text",
                text=f"{e['source']} -> {e['target']}: {key} {e[key]:.4g}, control {e.get('control', e.get(f'{key}_control', float('nan'))):.4g}",
                showlegend=False,
            )
        )
    hover = [
        f"{n['id']} {n['label'] or ''}<br>tokens: {' '.join(map(repr, n['tokens']))}<br>importance {n['importance']:.4g}"
        for n in nodes
    ]
    traces.append(
        go.Scatter(
            x=[pos[n["id"]][0] for n in nodes],
            y=[pos[n["id"]][1] for n in nodes],
            mode="markers+text",
            text=[n["label"] or n["id"] for n in nodes],
            textposition=[
                "middle left" if n["side"] == "upstream" else "middle right" for n in nodes
            ],
            hovertext=hover,
            hoverinfo="text",
            marker={
                "size": 9,
                "color": ["#444" if n["side"] == "upstream" else "#2a7" for n in nodes],
            },
            showlegend=False,
        )
    )
    fig = go.Figure(traces)
    fig.update_layout(
        title=f"strongest {len(edges)} edges ({key}; red raises the downstream code, blue lowers it)",
        xaxis={"visible": False, "range": [-0.6, 1.6]},
        yaxis={"visible": False},
        height=max(400, 18 * max(1, len(pos))),
    )
    return fig


def write_patch_report(
    path: str | Path,
    graph: dict[str, Any],
    effects: dict[str, Effects],
    agreement: dict[str, Any] | None = None,
    study: dict[str, Any] | None = None,
) -> Path:
    """report.html: summary tables, heatmaps with controls, attribution vs exact, the network."""
    figures = effect_figures(effects)
    if agreement and "exact" in effects and "attribution" in effects:
        figures["attribution vs exact"] = scatter_figure(
            effects["exact"], effects["attribution"], agreement
        )
    figures["feature graph"] = network_figure(graph)
    tables: dict[str, dict] = {
        "run": {
            "upstream": f"{graph['upstream']['hook']} ({graph['upstream']['basis']})",
            "downstream": f"{graph['downstream']['hook']} ({graph['downstream']['basis']})",
            **{f"{k}": json.dumps(v) for k, v in graph["methods"].items()},
            "control floor (|control| quantile)": f"{graph['control_floor']} ({graph['control_floor_quantile']})",
            "edges beating the control floor": sum(
                bool(e.get("beats_control")) for e in graph["edges"]
            ),
        }
    }
    if agreement:
        tables["attribution vs exact"] = agreement
    if study:
        tables["pruning thresholds"] = {
            f"{r['criterion']} >= q{r['quantile']}": json.dumps(
                {k: v for k, v in r.items() if k not in ("criterion", "quantile")}
            )  # fmt: skip
            for r in study["rows"]
        }
        tables["pruning thresholds"]["edge Jaccard, activation vs effect"] = json.dumps(study["edge_jaccard_activation_vs_effect"])  # fmt: skip
        tables["pruning thresholds"]["node rank corr, activation vs effect"] = json.dumps(study["node_rank_corr_activation_vs_effect"])  # fmt: skip
    return write_report(path, "analoglock: feature-to-feature effects", figures, tables)


def write_run_report(run: PatchRun) -> Path:
    """report.html beside a run's graph.json, from what `run_patch` returned."""
    return write_patch_report(
        run.out_dir / REPORT_FILE, run.graph, run.effects, run.agreement, run.threshold_study
    )
