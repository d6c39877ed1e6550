"""report.html for `analoglock-trace`: chain graph, ranked upstream features, AND/OR table.

Owns turning the JSON-ready dicts of `patching.chains.trace_chains` and
`patching.backwards.trace_backwards` into plotly figures; knows nothing of how they were computed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from analoglock.reports.html import write_report


def chain_figure(graph: dict[str, Any]) -> go.Figure:
    """Features and tokens on a circle; F->T edges (promotion) and T->F edges (z) as lines."""
    edges = [(f"F{e['feature']}", f"T{e['token']}") for e in graph["feature_token"] if e["kept"]]
    edges += [(f"T{e['token']}", f"F{e['feature']}") for e in graph["token_feature"]]
    text = {f"T{e['token']}": repr(e["text"]) for e in graph["feature_token"]}
    nodes = sorted({n for e in edges for n in e})
    pos = {n: (math.cos(2 * math.pi * k / max(1, len(nodes))), math.sin(2 * math.pi * k / max(1, len(nodes)))) for k, n in enumerate(nodes)}  # fmt: skip
    fig = go.Figure()
    for a, b in edges:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        color = "#1f77b4" if a.startswith("F") else "#d62728"
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", line={"color": color, "width": 1}, hoverinfo="skip", showlegend=False))  # fmt: skip
        fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", showarrow=True, arrowhead=2, arrowcolor=color, opacity=0.6)  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=[pos[n][0] for n in nodes],
            y=[pos[n][1] for n in nodes],
            mode="markers+text",
            text=[text.get(n, n) for n in nodes],
            textposition="top center",
            marker={
                "size": 12,
                "color": ["#1f77b4" if n.startswith("F") else "#d62728" for n in nodes],
            },  # fmt: skip
            showlegend=False,
        )
    )
    fig.update_layout(title="feature -> token (blue, above control) and token -> feature (red, z above control)", xaxis={"visible": False}, yaxis={"visible": False}, height=600)  # fmt: skip
    return fig


def ranked_figure(back: dict[str, Any]) -> go.Figure:
    """Top upstream features: attribution vs exact ablation vs the random-direction control."""
    feats = back["ranked"]["features"]
    names = [f"F{f['feature']}" for f in feats]
    fig = go.Figure()
    for key, label in (("attribution", "attribution"), ("exact", "exact ablation"), ("exact_control", "random direction (exact)")):  # fmt: skip
        fig.add_trace(go.Bar(x=names, y=[f[key] for f in feats], name=label))
    fig.update_layout(barmode="group", title=f"drive of {back['target']!r} logit (drop when ablated)", yaxis_title="logit drop")  # fmt: skip
    return fig


def and_or_figure(back: dict[str, Any]) -> go.Figure:
    """Relative drop of p(target) for single and pairwise ablations, and random pairs."""
    ao = back["and_or"]
    rows = [(f"F{s['feature']}", s["drop"], s["dlogit"]) for s in ao["single"]]
    rows += [("+".join(f"F{i}" for i in p["features"]), p["drop"], p["dlogit"]) for p in ao["pairs"]]  # fmt: skip
    rnd = ao["random_pairs"]
    cells = [[r[0] for r in rows] + ["random pairs (mean / max)"], [r[1] for r in rows] + [f"{rnd['drop_mean']} / {rnd['drop_max']}"], [r[2] for r in rows] + [""]]  # fmt: skip
    fig = go.Figure(go.Table(header={"values": ["ablated", "p drop (fraction)", "logit change"]}, cells={"values": cells}))  # fmt: skip
    fig.update_layout(title=f"{ao['class']} (kill = drop > {ao['kill']})", height=max(300, 22 * len(rows) + 120))  # fmt: skip
    return fig


def write_trace_report(path: str | Path, chains: dict[str, Any] | None, back: dict[str, Any] | None) -> Path:  # fmt: skip
    """report.html with whichever analyses ran."""
    figures: dict[str, go.Figure] = {}
    tables: dict[str, dict] = {}
    if back is not None:
        figures["ranked upstream features"] = ranked_figure(back)
        figures["AND / OR"] = and_or_figure(back)
        tables["working backwards"] = {
            "target": repr(back["target"]),
            "hook": back["hook"],
            "prompts kept": back["n_prompts"],
            "prompts dropped": ", ".join(f"{d['id']} ({d['greedy']!r})" for d in back["dropped"])
            or "none",  # fmt: skip
            "attribution vs exact (spearman)": round(back["ranked"]["agreement"]["spearman"], 3),
            "class": back["and_or"]["class"],
            "route groups": len(back["routes"]["groups"]),
            "disjoint route pairs (mean cos / random / shuffled)": "; ".join(
                f"{c['mean_cosine']} / {c['random_subspace_mean_cosine']} / {c['shuffled_groups_mean_cosine']}"
                for c in back["routes"]["disjoint_pairs"]
            )
            or "none",  # fmt: skip
        }
    if chains is not None:
        figures["chain graph"] = chain_figure(chains)
        v = chains.get("validation") or {}
        tables["chains"] = {
            "hook": chains["hook"],
            "feature->token edges kept": sum(e["kept"] for e in chains["feature_token"]),
            "token->feature edges kept": len(chains["token_feature"]),
            "chains": len(chains["chains"]),
            "cycles": "; ".join(" -> ".join(c) for c in chains["cycles"][:10]) or "none",
            "validation": ", ".join(f"{k}={v[k]}" for k in v) or "no chain to validate",
        }
    if not figures:
        raise ValueError("Nothing to report: neither chains nor backwards results were given.")
    return write_report(path, "analoglock-trace", figures, tables)
