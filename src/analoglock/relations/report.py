"""relations.json and report.html for an `analoglock-relations` run.

Owns turning analysis results into JSON (tensors to lists, private "_" keys dropped, NaN/inf to
null) and into plotly figures: cosine heatmaps with p-values, the separability matrix, the
hierarchy diagram, analogy accuracies beside their baselines, the ranked anomaly list; analyses
that live in other modules (interpolate, jacobian, shape) draw their own figures through their
module's `figures(result)`. Knows nothing of how the numbers were computed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch

from analoglock.atomic import write_json
from analoglock.reports.html import write_report

log = logging.getLogger(__name__)

RESULTS_FILE = "relations.json"
REPORT_FILE = "report.html"
OWN = ("algebra", "separability", "hierarchy", "recursive", "anomalies")


def jsonable(obj: Any) -> Any:
    """A JSON-ready copy: tensors become lists, keys starting with "_" are dropped, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


# ---------------------------------------------------------------- figures of our analyses


def _short(label: str) -> str:
    """Axis label without long prefixes."""
    return label.replace("animals:", "an:").replace("canines:", "can:")


def algebra_figures(res: dict) -> dict[str, go.Figure]:
    """Cosine heatmap (hover shows p and verdict) and -log10 p heatmap per hook."""
    figs = {}
    for hook, r in res.get("by_hook", {}).items():
        c = r["cosines"]
        labels = [_short(x) for x in c["labels"]]
        p = c.get("p_shuffled_normal") or c["p_shuffled"]
        text = [[f"p={p[i][j]:.3g}" for j in range(len(labels))] for i in range(len(labels))]
        figs[f"Relation cosines ({hook})"] = go.Figure(
            go.Heatmap(
                z=c["cos"],
                x=labels,
                y=labels,
                zmin=-1,
                zmax=1,
                colorscale="RdBu",
                text=text,
                hovertemplate="%{y} ~ %{x}<br>cos=%{z:.3f}<br>%{text}<extra></extra>",
            ),
            layout=dict(height=650, title="cosine of relation vectors; p vs shuffled labels"),
        )
        figs[f"Relation cosine p-values ({hook})"] = go.Figure(
            go.Heatmap(
                z=[[-math.log10(max(v, 1e-12)) for v in row] for row in p],
                x=labels,
                y=labels,
                colorscale="Viridis",
                colorbar=dict(title="-log10 p"),
            ),
            layout=dict(
                height=650,
                title=f"-log10 p (normal tail of the shuffled-label null, n={c['n_null']})",
            ),
        )
        comps = r.get("composites") or []
        if comps:
            names = [f"{x['a']} + {x['b']}" for x in comps]
            figs[f"Composite additivity ({hook})"] = go.Figure(
                [
                    go.Bar(
                        name="observed",
                        x=names,
                        y=[x["observed"]["activation"]["relative_error"] for x in comps],
                    ),
                    go.Bar(
                        name="random vectors, same norms",
                        x=names,
                        y=[x["random_relative_error_mean"] for x in comps],
                    ),
                ],
                layout=dict(
                    title="relative error ||e(a+b) - e(a) - e(b)|| / ||e(a) + e(b)|| at the read hook",
                    barmode="group",
                ),
            )
    return figs


def separability_figures(res: dict) -> dict[str, go.Figure]:
    """Separability matrix heatmap per hook."""
    figs = {}
    for hook, r in res.get("by_hook", {}).items():
        labels = [_short(x) for x in r["labels"]]
        p = r.get("p") or [[None] * len(labels)] * len(labels)
        text = [[f"p={v:.3g}" if v is not None else "" for v in row] for row in p]
        figs[f"Separability ({hook} -> {r['read_hook']})"] = go.Figure(
            go.Heatmap(
                z=r["matrix"],
                x=labels,
                y=labels,
                colorscale="RdBu",
                zmid=0,
                text=text,
                hovertemplate="push %{y}<br>read %{x}<br>shift=%{z:.3f} gaps<br>%{text}<extra></extra>",
            ),
            layout=dict(
                height=600,
                xaxis_title="readout (probe at read hook)",
                yaxis_title="pushed along",
                title=f"readout shift in class gaps; random-direction |shift| q95 = {r.get('random_abs_effect_q95') or 0:.3f}",
            ),
        )
    return figs


def hierarchy_figures(res: dict) -> dict[str, go.Figure]:
    """A tree: shared node, species children (edge = ||delta||, accuracy), generic node, top features."""
    figs = {}
    for hook, r in res.get("by_hook", {}).items():
        species = r["species"]
        n = len(species)
        xs = [i - (n - 1) / 2 for i in range(n)]
        fig = go.Figure()
        root = (0.0, 2.0)
        gen_pos = (n / 2 + 0.5, 1.0)
        for x, s in zip(xs, species, strict=True):
            fig.add_trace(
                go.Scatter(
                    x=[root[0], x],
                    y=[root[1], 1.0],
                    mode="lines",
                    line=dict(color="gray"),
                    showlegend=False,
                )
            )
            acc = r["accuracy"].get(f"{s} vs other species", {}).get("heldout_accuracy")
            feats = r["species_features"][s]["features"][:3]
            ftxt = "<br>".join(
                f"f{t['feature']}: d={t['d_train']:.2f}, ablate {t['ablation_effect_in_gaps']:+.2f} gaps"
                for t in feats
            )
            fig.add_annotation(
                x=x,
                y=0.75,
                text=f"<b>{s}</b><br>|delta|={r['norms'][f'delta {s}']:.2f}<br>acc vs species={acc:.2f}<br>{ftxt}",
                showarrow=False,
                font=dict(size=10),
            )
        fig.add_trace(
            go.Scatter(
                x=[root[0], gen_pos[0]],
                y=[root[1], gen_pos[1]],
                mode="lines",
                line=dict(color="gray", dash="dot"),
                showlegend=False,
            )
        )
        fig.add_annotation(
            x=gen_pos[0],
            y=gen_pos[1] - 0.2,
            text=f"<b>{r['generic']}</b> (generic word)<br>|offset|={r['norms']['generic_offset']:.2f}",
            showarrow=False,
        )
        ad = r.get("animal_direction")
        top = f"<b>shared ({r['set']})</b><br>|shared|={r['norms']['shared']:.1f}"
        if ad:
            top += f"<br>vs {', '.join(r['reference'])}: acc {ad['heldout_accuracy_vs_reference']:.2f} (random {ad['random_direction_accuracy_mean']:.2f})"
        fig.add_annotation(x=root[0], y=root[1] + 0.25, text=top, showarrow=False)
        fig.add_trace(
            go.Scatter(
                x=[root[0], *xs, gen_pos[0]],
                y=[root[1], *[1.0] * n, gen_pos[1]],
                mode="markers",
                marker=dict(size=14),
                showlegend=False,
            )
        )
        fig.update_layout(
            height=520,
            title=f"Hierarchy of {r['set']} at {hook}",
            xaxis=dict(visible=False),
            yaxis=dict(visible=False, range=[0.3, 2.6]),
        )
        figs[f"Hierarchy ({hook})"] = fig
    return figs


def recursive_figures(res: dict) -> dict[str, go.Figure]:
    """Analogy accuracy vs baselines (levels 1 and 2) and second-order comparisons."""
    figs = {}
    for hook, r in res.get("by_hook", {}).items():
        levels = [lv for lv in ("level1", "level2") if r[lv].get("n")]
        if levels:
            figs[f"Parallelogram analogies ({hook})"] = go.Figure(
                [
                    go.Bar(name="accuracy", x=levels, y=[r[lv]["accuracy"] for lv in levels]),
                    go.Bar(
                        name="random offset (mean)",
                        x=levels,
                        y=[r[lv]["random_offset_accuracy_mean"] for lv in levels],
                    ),
                    go.Bar(
                        name="no offset", x=levels, y=[r[lv]["no_offset_accuracy"] for lv in levels]
                    ),
                ],
                layout=dict(
                    barmode="group",
                    yaxis=dict(range=[0, 1]),
                    title="a : b :: c : ? (nearest to c + b - a, excluding a, b, c)",
                ),
            )
        comps = r.get("comparisons") or []
        if comps:
            names = [f"{c['r1']} vs {c['r2']}" for c in comps]
            figs[f"Relations of relations ({hook})"] = go.Figure(
                [
                    go.Bar(
                        name="||r1 - r2|| / mean norm",
                        x=names,
                        y=[c["normalised_difference"] for c in comps],
                    ),
                    go.Bar(
                        name="shuffled-label null",
                        x=names,
                        y=[c["normalised_difference_null_shuffled_mean"] for c in comps],
                    ),
                    go.Bar(
                        name="random directions",
                        x=names,
                        y=[c["normalised_difference_random_mean"] for c in comps],
                    ),
                ],
                layout=dict(
                    barmode="group",
                    title="second-order differences (smaller = more similar relations)",
                ),
            )
    return figs


def anomaly_figures(res: dict, top: int = 25) -> dict[str, go.Figure]:
    """Top anomalies as a horizontal bar chart of robust z."""
    rows = res.get("ranked", [])[:top]
    if not rows:
        return {}
    names = [f"{r['rank']}. {r['kind']}: {_short(r['target'])}" for r in rows][::-1]
    z = [max(min(r["robust_z"] if r["robust_z"] is not None else 0, 1e3), -1e3) for r in rows][::-1]
    return {
        "Anomalies (ranked by |robust z|)": go.Figure(
            go.Bar(x=z, y=names, orientation="h"),
            layout=dict(
                height=max(400, 22 * len(rows)), margin=dict(l=420), xaxis_title="robust z vs null"
            ),
        )
    }


FIGURES = {
    "algebra": algebra_figures,
    "separability": separability_figures,
    "hierarchy": hierarchy_figures,
    "recursive": recursive_figures,
    "anomalies": anomaly_figures,
}


def figures(results: dict[str, Any]) -> dict[str, go.Figure]:
    """Every analysis's figures; other modules' analyses through their own `figures(result)`."""
    from analoglock.relations import analysis_module

    out: dict[str, go.Figure] = {}
    for name, res in results.items():
        if name in FIGURES:
            out.update(FIGURES[name](res))
            continue
        try:
            draw = getattr(analysis_module(name), "figures", None)
        except (ValueError, ImportError) as err:
            log.warning("no figures for %s: %s", name, err)
            continue
        if draw is not None:
            out.update(
                {(k if k.startswith(name) else f"{name}: {k}"): v for k, v in draw(res).items()}
            )
    return out


# ---------------------------------------------------------------- tables


def headline(results: dict[str, Any]) -> dict[str, str]:
    """A few numbers a reader wants first, each beside its control."""
    t: dict[str, str] = {}
    for hook, r in results.get("algebra", {}).get("by_hook", {}).items():
        pairs = r["cosines"]["pairs"]
        counts = {
            v: sum(p["verdict"] == v for p in pairs)
            for v in ("aligned", "anti-aligned", "orthogonal", "weak")
        }
        t[f"{hook}: relation pairs by verdict"] = ", ".join(f"{k} {v}" for k, v in counts.items())
    for hook, r in results.get("recursive", {}).get("by_hook", {}).items():
        for lv in ("level1", "level2"):
            a = r[lv]
            if a.get("n"):
                t[f"{hook}: {lv} analogy accuracy"] = (
                    f"{a['accuracy']:.2f} (n={a['n']}) vs random offset {a['random_offset_accuracy_mean']:.2f} "
                    f"(p={a['p_random']:.3g}), no offset {a['no_offset_accuracy']:.2f}"
                )
        for c in r.get("comparisons", []):
            t[f"{hook}: cos({c['r1']}, {c['r2']})"] = (
                f"{c['cos']:.3f} (shuffled null mean {c['cos_null_shuffled_mean']:.3f}, p={c['p_cos_shuffled']:.3g}; "
                f"random directions of the space: |cos| q95 {c['cos_random_q95']:.3f}, p={c['p_cos_random']:.3g})"
            )
    for hook, r in results.get("separability", {}).get("by_hook", {}).items():
        sep = sum(x["separable"] for x in r["rows"])
        t[f"{hook}: separable contrasts"] = f"{sep} of {len(r['rows'])} (read at {r['read_hook']})"
    return t


def _anomaly_line(r: dict) -> str:
    """One anomaly as a table cell."""
    return (
        f"{r['kind']} | {r['target']} | {r['hook']} | value {r['value']:.4g} vs null median "
        f"{r['null_median']:.4g} | z {r['robust_z']:.2f} | p {r['p']:.3g}"
    )


def anomaly_table(results: dict[str, Any], top: int = 20) -> dict[str, str]:
    """Rank -> one line per anomaly."""
    rows = results.get("anomalies", {}).get("ranked", [])[:top]
    return {f"{r['rank']}": _anomaly_line(r) for r in rows if r.get("robust_z") is not None}


def anomaly_kind_table(results: dict[str, Any], per_kind: int = 3) -> dict[str, str]:
    """The top few of every kind (kinds differ in scale, so the overall ranking favours some)."""
    out = {}
    for kind, rows in results.get("anomalies", {}).get("top_by_kind", {}).items():
        for k, r in enumerate(rows[:per_kind]):
            if r.get("robust_z") is not None:
                out[f"{kind} #{k + 1}"] = _anomaly_line(r)
    return out


def write_outputs(
    out_dir: str | Path, results: dict[str, Any], meta: dict[str, Any]
) -> dict[str, Path]:
    """Write relations.json (meta + results) and report.html into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = jsonable({"meta": meta, "results": results})
    write_json(out / RESULTS_FILE, data)
    tables = {"Run": {k: v for k, v in meta.items() if not isinstance(v, (dict, list))}}
    head = headline(data["results"])
    if head:
        tables["Headline numbers (each beside its control)"] = head
    anomalies = anomaly_table(data["results"])
    if anomalies:
        tables["Anomalies (look here first)"] = anomalies
    by_kind = anomaly_kind_table(data["results"])
    if by_kind:
        tables["Anomalies: the top of each kind"] = by_kind
    write_report(out / REPORT_FILE, "analoglock relations", figures(data["results"]), tables)
    return {"json": out / RESULTS_FILE, "html": out / REPORT_FILE}
