"""Figures of the relations analyses that follow paths or search: interpolation curves and counts,
derivative sizes beside random directions and step responses, shape-search scores beside their
random-candidate baseline. Drawn from relations.json results; `reports.relations` assembles them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go
import torch


def _main_paths(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The main (non-control) input paths."""
    return [p for p in result.get("paths", []) if p.get("kind") == "main"]


def interpolate_figures(result: Mapping[str, Any]) -> dict[str, go.Figure]:
    """Interpolation curves of the commonality/tangent features, counts vs controls, abstract split."""
    figs: dict[str, go.Figure] = {}
    names = result["features"]
    steps = result["steps"]
    for p in _main_paths(result):
        shown = list(dict.fromkeys(p["commonalities"] + p["tangents"]))[:12]
        if not shown:  # nothing flagged: show the features with the largest excursion
            z = torch.tensor(p["z"])
            shown = [names[i] for i in z.abs().max(0).values.topk(min(6, z.shape[1])).indices]
        fig = go.Figure()
        for name in shown:
            j = names.index(name)
            tag = (
                "common"
                if name in p["commonalities"]
                else "tangent"
                if name in p["tangents"]
                else ""
            )
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=[row[j] for row in p["z"]],
                    mode="lines+markers",
                    name=f"{name} {tag}",
                )
            )
        fig.add_hline(y=result["theta"], line_dash="dash", annotation_text="theta")
        fig.update_layout(
            title=f"{p['hook']} ({p['mode']}): feature z along the path; A at t=0, B at t=1",
            xaxis_title="t",
            yaxis_title=f"z at {result['read_hook']}",
        )
        figs[f"interpolate/{p['hook']}/{p['mode']}"] = fig
    labels, main_c, main_t, ctrl = [], [], [], {}
    for row in result.get("summary", []):
        labels.append(f"{row['hook']} {row['mode']}")
        first = next(iter(row["commonalities"].values()), None)
        main_c.append(first["main"] if first else 0)
        main_t.append(next(iter(row["tangents"].values()))["main"] if first else 0)
        for kind, st in row["commonalities"].items():
            ctrl.setdefault(f"{kind} commonalities (mean)", []).append(st["control_mean"])
        for kind, st in row["tangents"].items():
            ctrl.setdefault(f"{kind} tangents (mean)", []).append(st["control_mean"])
    if labels:
        fig = go.Figure(
            [
                go.Bar(name="commonalities", x=labels, y=main_c),
                go.Bar(name="tangents", x=labels, y=main_t),
            ]
        )
        for name, ys in ctrl.items():
            fig.add_trace(go.Bar(name=name, x=labels, y=ys, opacity=0.5))
        fig.update_layout(
            barmode="group", title="Commonalities and tangents: main path vs control paths"
        )
        figs["interpolate/counts"] = fig
    rel = result.get("relation")
    if rel:
        fig = go.Figure()
        for p in rel["paths"]:
            if p.get("kind") != "main":
                continue
            for name in list(dict.fromkeys(p["commonalities"] + p["tangents"]))[:8]:
                j = names.index(name)
                fig.add_trace(
                    go.Scatter(
                        x=steps,
                        y=[row[j] for row in p["z"]],
                        mode="lines+markers",
                        name=f"{p['mode']} {name}",
                    )
                )
        fig.add_hline(y=result["theta"], line_dash="dash", annotation_text="theta")
        fig.update_layout(
            title=f"Relation path {rel['names'][0]} -> {rel['names'][1]} at {rel['hook']}",
            xaxis_title="t",
            yaxis_title="z",
        )
        figs["interpolate/relation"] = fig
    ab = result.get("abstract")
    if ab:
        fig = go.Figure(
            [
                go.Bar(
                    x=[
                        "abstract (own paraphrase)",
                        "superficial",
                        "survive a different pair's paraphrase (control)",
                    ],
                    y=[ab["n_abstract"], ab["n_superficial"], ab["n_abstract_control"]],
                )
            ]
        )
        fig.update_layout(
            title=f"Commonalities over {ab['n_pairs']} pairs: abstract vs superficial"
        )
        figs["interpolate/abstract"] = fig
    return figs


def jacobian_figures(result: Mapping[str, Any]) -> dict[str, go.Figure]:
    """Derivative sizes beside both kinds of random directions, and step-response curves."""
    size = result["size"]
    dirs = result["directions"]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=[f"d{d['index']}" for d in dirs], y=[d[size] for d in dirs], name="basis directions"
        )
    )
    for key in ("random", "random_covariance"):
        block = result.get(key)
        if block:
            ys = [r[size] for r in block["directions"]]
            fig.add_trace(go.Box(y=ys, name=f"random ({block['kind']})", boxpoints="all"))
    fig.update_layout(
        title=f"{result['hook']}: {size} of d output / d step, ranked, beside random unit directions",
        yaxis_title=size,
    )
    figs = {"jacobian/ranked": fig}
    fig = go.Figure()
    for d in dirs[:6]:
        for side in ("+", "-"):
            fig.add_trace(
                go.Scatter(
                    x=result["steps"],
                    y=d["response_ratio"][side],
                    mode="lines+markers",
                    name=f"d{d['index']} {side} ({d['class'][side]})",
                )
            )
    for j, r in enumerate(result["random"]["directions"][:3]):
        fig.add_trace(
            go.Scatter(
                x=result["steps"],
                y=r["response_ratio"]["+"],
                mode="lines",
                line_dash="dot",
                name=f"random {j} +",
            )
        )
    fig.add_hline(y=1.0, line_dash="dash", annotation_text="linear")
    fig.update_layout(
        title="Step response / derivative prediction (1 = linear)",
        xaxis_title=f"step ({result['step_unit']})",
        xaxis_type="log",
        yaxis_title="response ratio",
    )
    figs["jacobian/response"] = fig
    return figs


def shape_figures(result: Mapping[str, Any]) -> dict[str, go.Figure]:
    """Top assignments' scores beside the best scores of the same search on random candidates."""
    figs = {}
    for name, res in result.get("searches", {"shape": result}).items():
        labels = [" ".join(f"{k}={v}" for k, v in r["assignment"].items()) for r in res["results"]]
        fig = go.Figure(
            go.Bar(
                x=[r["score"] for r in res["results"]], y=labels, orientation="h", name="candidates"
            )
        )
        rs = res["random_search"]
        if rs["max"] is not None:
            fig.add_vline(x=rs["max"], line_dash="dash", annotation_text="best random (max)")
            fig.add_vline(x=rs["mean"], line_dash="dot", annotation_text="best random (mean)")
        fig.update_layout(
            title=f"{name}: shape search, best first (p = {rs['p_value']:.3g}, "
            f"floor {rs.get('p_floor', 0):.3g}, {len(rs['best_scores'])} random searches)",
            xaxis_title="score",
            yaxis_autorange="reversed",
        )
        figs[f"shape/{name}"] = fig
    return figs
