"""relations.json and report.html for an `analoglock-relations` run.

Owns turning analysis results into JSON (tensors to lists, private "_" keys dropped, NaN/inf to
null), into plotly figures (cosine heatmaps with p-values, the separability matrix, the hierarchy
diagram, analogy accuracies beside their baselines, the ranked anomaly list, interpolation curves,
derivative sizes beside random directions, shape-search scores) and into the headline table, where
every number stands beside its control and the kind of its null (permutation, model-based normal
fit, isotropic or covariance random directions). Knows nothing of how the numbers were computed.
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
from analoglock.reports.lre import lre_figures
from analoglock.reports.relation_paths import (
    interpolate_figures,
    jacobian_figures,
    shape_figures,
)

log = logging.getLogger(__name__)

RESULTS_FILE = "relations.json"
REPORT_FILE = "report.html"


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
            layout=dict(
                height=650,
                title="cosine of relation vectors; p: normal fit to the shuffled-label null",
            ),
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
                    *[
                        go.Bar(
                            name=f"random vectors, same norms ({kind})",
                            x=names,
                            y=[x["random_relative_error"].get(kind, {}).get("mean") for x in comps],
                        )
                        for kind in ("isotropic", "covariance")
                    ],
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
                title="readout shift in class gaps; random pushes of equal norm, |shift| q95: "
                + ", ".join(
                    f"{k} {v:.3f}" for k, v in (r.get("random_abs_effect_q95") or {}).items()
                ),
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
                        name="isotropic random offset (mean)",
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
                        name="random directions of the space (covariance)",
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
    "interpolate": interpolate_figures,
    "jacobian": jacobian_figures,
    "shape": shape_figures,
    "lre": lre_figures,
}


def figures(results: dict[str, Any]) -> dict[str, go.Figure]:
    """Every analysis's figures (an analysis with no drawing here gets none, with a log line)."""
    out: dict[str, go.Figure] = {}
    for name, res in results.items():
        draw = FIGURES.get(name)
        if draw is None:
            log.warning("no figures for analysis %s", name)
            continue
        out.update(draw(res))
    return out


# ---------------------------------------------------------------- tables


def _p(x: float | None) -> str:
    """A p-value for a table cell."""
    return "n/a" if x is None else f"{x:.3g}"


def headline(results: dict[str, Any]) -> dict[str, str]:
    """A few numbers a reader wants first, each beside its control and the kind of its null."""
    t: dict[str, str] = {}
    alg = results.get("algebra", {})
    for hook, r in alg.get("by_hook", {}).items():
        pairs = r["cosines"]["pairs"]
        counts = {
            v: sum(p["verdict"] == v for p in pairs)
            for v in ("aligned", "anti-aligned", "orthogonal", "weak")
        }
        t[f"{hook}: relation pairs by verdict"] = (
            ", ".join(f"{k} {v}" for k, v in counts.items())
            + " (q: BH over a normal fit to the shuffled-label null, not a permutation p; "
            "aligned also needs p < alpha against random directions of the space)"
        )
        for cp in r.get("composites") or []:
            nulls = "; ".join(
                f"{k} pairs mean {e['mean']:.3f}, p = {_p(e['p_smaller'])} (floor {e['p_floor']:.2g})"
                for k, e in cp.get("random_relative_error", {}).items()
            )
            t[f"{hook}: composite {cp['a']} + {cp['b']}: additivity error"] = (
                f"{cp['observed']['activation']['relative_error']:.3f} vs random vectors of the "
                f"same norms: {nulls}"
            )
    for s in alg.get("composites_skipped") or []:
        t[f"skipped: {s}"] = "default composite left out: its set was not requested"
    for hook, r in results.get("separability", {}).get("by_hook", {}).items():
        sep = sum(x["separable"] for x in r["rows"])
        q95 = ", ".join(f"{k} {v:.3f}" for k, v in (r.get("random_abs_effect_q95") or {}).items())
        t[f"{hook}: separable contrasts"] = (
            f"{sep} of {len(r['rows'])} (read at {r['read_hook']}; random pushes of equal norm, "
            f"|effect| q95: {q95}; both nulls must reject)"
        )
    for hook, r in results.get("hierarchy", {}).get("by_hook", {}).items():
        for sp, block in r.get("species_features", {}).items():
            for f in block["features"][:1]:
                ctrl = "; ".join(
                    f"{k} mean |effect| {c['mean_abs']:.3f}, p = {_p(c['p'])}"
                    for k, c in f.get("random_equal_norm", {}).items()
                )
                t[f"{hook}: ablating {sp}'s top feature f{f['feature']}"] = (
                    f"{f['ablation_effect_in_gaps']:+.3f} class gaps vs random edits of the same "
                    f"norm per token ({ctrl})"
                )
    for hook, r in results.get("recursive", {}).get("by_hook", {}).items():
        for lv in ("level1", "level2"):
            a = r[lv]
            if a.get("n"):
                cov = a.get("random_covariance_offset_accuracy_mean")
                cov_txt = (
                    f", covariance offset {cov:.2f} (p={_p(a.get('p_random_covariance'))})"
                    if cov is not None
                    else ""
                )
                t[f"{hook}: {lv} analogy accuracy"] = (
                    f"{a['accuracy']:.2f} (n={a['n']}) vs isotropic random offset "
                    f"{a['random_offset_accuracy_mean']:.2f} (p={_p(a['p_random'])}){cov_txt}, "
                    f"no offset {a['no_offset_accuracy']:.2f}"
                )
        for c in r.get("comparisons", []):
            t[f"{hook}: cos({c['r1']}, {c['r2']})"] = (
                f"{c['cos']:.3f} (shuffled-label permutation null mean {c['cos_null_shuffled_mean']:.3f}, "
                f"p={_p(c['p_cos_shuffled'])}; random directions of the space (covariance): |cos| "
                f"q95 {c['cos_random_q95']:.3f}, p={_p(c['p_cos_random'])}; isotropic "
                f"p={_p(c.get('p_cos_isotropic'))})"
            )
    jac = results.get("jacobian")
    if jac and jac.get("best"):
        b = jac["best"]
        vs = "; ".join(
            f"{k}: {v['ratio_to_max']:.2f}x their max, rank {v['rank']} of {jac['random']['n'] + 1}"
            for k, v in b["vs_random"].items()
        )
        t[f"{jac['hook']}: largest derivative (d{b['index']})"] = (
            f"{b[jac['size']]:.4g} vs random unit directions ({vs})"
        )
    for name, res in (results.get("shape") or {}).get("searches", {}).items():
        rs = res["random_search"]
        t[f"shape search {name}"] = (
            f"best {res['best_score']:.3f} vs the same search on {len(rs['best_scores'])} "
            f"covariance-matched random candidate sets: max {rs['max']:.3f}, "
            f"p = {_p(rs['p_value'])} (floor {rs.get('p_floor', 0):.3g})"
        )
    ab = (results.get("interpolate") or {}).get("abstract")
    if ab:
        t["interpolation: abstract commonalities"] = (
            f"{ab['n_abstract']} of {ab['n_commonalities']} (rate {ab['abstract_rate'] or 0:.2f}) "
            f"vs another pair's paraphrases {ab['abstract_rate_control'] or 0:.2f} "
            f"({ab['n_pairs']} pairs)"
        )
        if "abstract_rate_minus_control_ci95" in ab:  # results written before it have none
            lo, hi = ab["abstract_rate_minus_control_ci95"]
            t["interpolation: abstract commonalities"] += (
                f"; difference {ab['abstract_rate_minus_control']:+.2f} [{lo:+.2f}, {hi:+.2f}], "
                "95% bootstrap over pairs"
            )
    return t


def _anomaly_line(r: dict) -> str:
    """One anomaly as a table cell."""
    return (
        f"{r['kind']} | {r['target']} | {r['hook']} | value {r['value']:.4g} vs null median "
        f"{r['null_median']:.4g} | z {r['robust_z']:.2f} | p {r['p']:.3g}"
        + (f" | null: {r['null']}" if r.get("null") else "")
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
