"""Figures, tables and a page for the "lre" analysis (relations as operators).

Owns drawing the results of `analoglock.relations.lre.run` as they sit in relations.json:
faithfulness and causality per relation with their bootstrap intervals, the LRE beside every
baseline and beside random edits of the same norm; the layer and rank sweeps; the means over
relations and per relation kind; and a Markdown table for docs. `python -m analoglock.reports.lre
RUN_DIR_OR_JSON` writes lre.html and lre.md next to the results. Knows nothing of how the
numbers were computed.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from analoglock.atomic import write_text
from analoglock.reports.html import write_report

log = logging.getLogger(__name__)

BASELINES = ("identity", "translation", "linreg", "meandiff", "lock")
HTML_FILE, MD_FILE = "lre.html", "lre.md"


def _done(res: dict) -> list[dict]:
    """The relations that were scored (not skipped)."""
    return [r for r in res.get("relations", []) if "by_layer" in r]


def _at(r: dict, layer: Any) -> dict:
    """One relation's results at a layer."""
    return r["by_layer"][str(layer)]


def _bar(names: list[str], cells: list[dict], label: str) -> go.Bar:
    """Bars of interval cells ({mean, lo, hi}) with asymmetric error bars."""
    y = [_mean(c) for c in cells]
    lo = [float("nan") if c.get("lo") is None else c["lo"] for c in cells]
    hi = [float("nan") if c.get("hi") is None else c["hi"] for c in cells]
    return go.Bar(
        name=label,
        x=names,
        y=y,
        error_y=dict(
            type="data",
            symmetric=False,
            array=[h - m for h, m in zip(hi, y, strict=True)],
            arrayminus=[m - lo_ for m, lo_ in zip(y, lo, strict=True)],
        ),
    )


def lre_figures(res: dict) -> dict[str, go.Figure]:
    """Per relation bars (faithfulness, causality beside random), the layer sweep heatmaps and
    the rank sweep, at the headline layer."""
    done = _done(res)
    if not done:
        return {}
    L, summary = res["main_layer"], res.get("summary", {})
    lre_c = summary.get("lre_edit", "lre")
    names = [r["name"] for r in done]
    figs: dict[str, go.Figure] = {}
    for key, title in (
        ("faithfulness", "top token over the vocabulary"),
        ("faithfulness_objects", "top among the relation's objects"),
    ):
        fig = go.Figure(
            [_bar(names, [_at(r, L)[key][m] for r in done], m) for m in ("lre", *BASELINES)]
        )
        fig.update_layout(
            barmode="group",
            title=f"Faithfulness at layer {L}: {title} is the object's first token (95% bootstrap)",
            yaxis=dict(range=[0, 1.05]),
        )
        figs[f"LRE faithfulness ({key}, layer {L})"] = fig
    bars = [_bar(names, [_at(r, L)["causality"][m] for r in done], m) for m in (lre_c, *BASELINES)]
    bars.append(
        _bar(names, [_at(r, L)["causality_random"][lre_c] for r in done], "random, same norm")
    )
    fig = go.Figure(bars)
    fig.update_layout(
        barmode="group",
        title=f"Causality at layer {L}: after the edit p(target object) > p(source object)",
        yaxis=dict(range=[0, 1.05]),
    )
    figs[f"LRE causality (layer {L})"] = fig
    layers = [str(x) for x in res["layers"]]
    for key, m in (("faithfulness", "lre"), ("causality", lre_c)):
        z = [[_mean(r["by_layer"][x][key][m]) for x in layers] for r in done]
        figs[f"Layer sweep: {key} of {m}"] = go.Figure(
            go.Heatmap(z=z, x=layers, y=names, zmin=0, zmax=1, colorscale="Viridis"),
            layout=dict(
                title=f"{key} of {m} by subject layer",
                xaxis_title="layer",
                height=max(400, 22 * len(names)),
            ),
        )
    ranks = sorted(
        {int(k.split("@")[1]) for k in _at(done[0], L)["faithfulness"] if k.startswith("lre@")}
    )
    fig = go.Figure()
    for key in ("faithfulness", "causality"):
        ys = []
        for k in ranks:
            vals = [_mean(_at(r, L)[key][f"lre@{k}"]) for r in done]
            vals = [v for v in vals if v == v]  # relations with no edit pair have no causality
            ys.append(sum(vals) / len(vals) if vals else float("nan"))
        fig.add_trace(go.Scatter(x=ranks, y=ys, mode="lines+markers", name=key))
    fig.update_layout(
        title=f"Rank sweep at layer {L}: mean over {len(done)} relations",
        xaxis=dict(title="rank of W", type="log"),
        yaxis=dict(range=[0, 1.05]),
    )
    figs[f"Rank sweep (layer {L})"] = fig
    return figs


def _num(x: float | None) -> str:
    """A rate, or n/a where nothing was scored (NaN is null in relations.json)."""
    return "n/a" if x is None or x != x else f"{x:.2f}"


def _cell(c: dict | None) -> str:
    """A mean with its interval."""
    if not c or c.get("mean") is None or c["mean"] != c["mean"]:
        return "n/a"
    return f"{c['mean']:.2f} [{_num(c['lo'])}, {_num(c['hi'])}]"


def _mean(c: dict) -> float:
    """A cell's mean for plotting and ranking (n/a as NaN)."""
    m = c.get("mean")
    return float("nan") if m is None else float(m)


def lre_headline(res: dict) -> dict[str, str]:
    """Means over relations at the headline layer, each beside the baselines and its interval."""
    s = res.get("summary") or {}
    if not s.get("n_relations"):
        return {"relations scored": "0"}
    t = {"relations scored": f"{s['n_relations']} (skipped {len(s.get('skipped', {}))})"}
    for key in ("faithfulness", "faithfulness_objects", "causality"):
        block = s[key]
        lead = next(iter(block["mean"]))
        t[f"{key}: {lead}"] = _cell(block["mean"][lead])
        for m, c in block["mean"].items():
            if m != lead:
                t[f"{key}: {m} (LRE minus it)"] = f"{_cell(c)} ({_cell(block['lre_minus'][m])})"
        if "random" in block:
            t[f"{key}: random edits of the LRE's norm"] = _cell(block["random"][lead])
        t[f"{key}: LRE beats every baseline"] = str(block["beats_every_baseline"])
    t["causality: each relation's best LRE rank (optimistic: picked on the same edits)"] = _cell(
        s["causality"]["lre_best_rank"]
    )
    t["degenerate: one held-out object token (left out of the means)"] = (
        ", ".join(s.get("degenerate", [])) or "none"
    )
    t["linear (LRE faithfulness >= threshold)"] = ", ".join(s["linear"]) or "none"
    t["not linear"] = ", ".join(s["not_linear"]) or "none"
    return t


def relation_rows(res: dict) -> dict[str, str]:
    """One line per relation: sizes, then LRE and the best baseline for both measures."""
    L = res["main_layer"]
    lre_c = (res.get("summary") or {}).get("lre_edit", "lre")
    rows = {}
    for r in res.get("relations", []):
        if "skipped" in r:
            rows[r["name"]] = f"skipped: {r['skipped']}"
            continue
        a = _at(r, L)
        best_f = max(BASELINES, key=lambda m: _mean(a["faithfulness"][m]))
        best_c = max(BASELINES, key=lambda m: _mean(a["causality"][m]) if r["n_pairs"] else 0)
        one = (
            " | one held-out object token: left out of the means" if r["n_test_objects"] < 2 else ""
        )
        rows[r["name"]] = (
            f"{r['kind']} | train {r['n_train']}, test {r['n_test']} of {r['n_heldout']} held out, "
            f"{r['n_pairs']} edits | faithfulness LRE {_cell(a['faithfulness']['lre'])} vs "
            f"{best_f} {_cell(a['faithfulness'][best_f])} | causality {lre_c} "
            f"{_cell(a['causality'][lre_c])} vs {best_c} {_cell(a['causality'][best_c])}, random "
            f"{_cell(a['causality_random'][lre_c])}{one}"
        )
    return rows


def markdown(res: dict) -> str:
    """The per-relation table and the means, as Markdown (for docs/benchmarks.md)."""
    L = res["main_layer"]
    s = res.get("summary") or {}
    lre_c = s.get("lre_edit", "lre")
    head = (
        "| relation | kind | n test | n edits | faith. LRE | "
        + " | ".join(f"faith. {m}" for m in BASELINES)
        + f" | causal. {lre_c} | "
        + " | ".join(f"causal. {m}" for m in BASELINES)
        + " | causal. random | best layer |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    best = s.get("best_layer", {})
    for r in _done(res):
        a = _at(r, L)
        f = [_num(a["faithfulness"][m]["mean"]) for m in BASELINES]
        c = [_num(a["causality"][m]["mean"]) for m in BASELINES]
        f.insert(0, f"**{_cell(a['faithfulness']['lre'])}**")
        c.insert(0, f"**{_cell(a['causality'][lre_c])}**")
        name = r["name"] + (" (one object token)" if r["n_test_objects"] < 2 else "")
        lines.append(
            f"| {name} | {r['kind']} | {r['n_test']} | {r['n_pairs']} | "
            + " | ".join(f + c)
            + f" | {_num(a['causality_random'][lre_c]['mean'])} | {best.get(r['name'], '')} |"
        )
    if s.get("n_relations"):
        mean = [f"**mean of {s['n_relations']}**", "", "", ""]
        for key, lead in (("faithfulness", "lre"), ("causality", lre_c)):
            for m in (lead, *BASELINES):
                mean.append(_cell(s[key]["mean"][m]))
        mean.append(_cell(s["causality"]["random"][lre_c]))
        lines.append("| " + " | ".join(mean) + " | |")
    skipped = [r for r in res.get("relations", []) if "skipped" in r]
    if skipped:
        lines.append("")
        lines.append("Skipped: " + "; ".join(f"{r['name']} ({r['skipped']})" for r in skipped))
    return "\n".join(lines) + "\n"


def write_lre_report(out_dir: str | Path, res: dict, meta: dict | None = None) -> dict[str, Path]:
    """lre.html (figures and tables) and lre.md (the Markdown table) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {}
    if meta:
        tables["Run"] = {k: v for k, v in meta.items() if not isinstance(v, (dict, list))}
    tables["Settings"] = {k: str(v) for k, v in (res.get("settings") or {}).items()}
    tables[f"Means over relations at layer {res['main_layer']} (95% bootstrap over relations)"] = (
        lre_headline(res)
    )
    tables["Per relation"] = relation_rows(res)
    write_report(
        out / HTML_FILE, "analoglock: relations as operators (LRE)", lre_figures(res), tables
    )
    write_text(out / MD_FILE, markdown(res))
    return {"html": out / HTML_FILE, "md": out / MD_FILE}


def main(argv: list[str] | None = None) -> None:
    """Render lre.html and lre.md from a finished run's relations.json (or its folder)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("run", help="a relations.json with an 'lre' result, or the run folder")
    args = ap.parse_args(argv)
    path = Path(args.run)
    path = path / "relations.json" if path.is_dir() else path
    data = json.loads(path.read_text())
    res = data.get("results", data).get("lre")
    if res is None:
        raise SystemExit(f"{path} holds no 'lre' result (run analoglock-relations analyses=[lre])")
    paths = write_lre_report(path.parent, res, data.get("meta"))
    logging.basicConfig(level=logging.INFO)
    log.info("wrote %s and %s", paths["html"], paths["md"])


if __name__ == "__main__":
    main()
