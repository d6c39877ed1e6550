"""Feature dashboards: one static, offline HTML page per feature basis.

Owns the page: an index of every feature (sorted by activation frequency) and, for the most
frequent N features, collapsible sections with top-activating contexts (activating token in
<mark>), an activation histogram and the logit lens of the feature's direction beside an
equal-norm random-direction control. Also owns the logit-lens tables drawn there (from `analoglock.unembed`,
`lens_extremes`) and the compatibility check between a basis, a harvest and a model.
Knows nothing of how bases are fit or labels are made (it reads `analoglock.bases.labels` if present).

Logit lens choice: a direction's promoted tokens are `(direction * g) @ W_U`, where `g` is the
final norm's elementwise gain (for LayerNorm the direction is centred first, which is also linear).
The norm's per-position 1/rms scale is a positive scalar that does not change which tokens a
direction promotes, so it is left out; the unembedding bias is a constant, not the direction's.
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import plotly.graph_objects as go
import torch
from plotly.offline import get_plotlyjs
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.atomic import write_text
from analoglock.bases.base import ACTIVE_EPS
from analoglock.bases.contexts import Context, feature_codes, feature_frequency, top_contexts
from analoglock.stats import random_unit_directions
from analoglock.unembed import unembedding

log = logging.getLogger(__name__)

DASHBOARD_FILE = "dashboard.html"
DENSE_FREQUENCY = 0.99  # every feature active above this: a dense basis, frequency says nothing
N_CONTROL_DIRECTIONS = 64  # random unit directions: the lens spread of that norm by chance


class IncompatibleBasisError(ValueError):
    """A basis fit on another model or hook than the harvest (or model) it is shown with."""


# --- compatibility ------------------------------------------------------------------------------


def check_compatible(
    basis_cfg: dict[str, Any], harvest_meta: dict[str, Any], model_sha256: str | None = None
) -> str:
    """The hook shared by a basis cfg.json and a harvest meta.json, or IncompatibleBasisError."""
    hook = basis_cfg.get("hook") or ""
    hooks = list(harvest_meta.get("hooks", []))
    if hook not in hooks:
        raise IncompatibleBasisError(
            f"The basis was fit at hook {hook!r} but the harvest holds {hooks}; "
            "harvest that hook or pick a basis fit on this harvest's hook."
        )
    b_sha = (basis_cfg.get("model") or {}).get("sha256")
    h_sha = (harvest_meta.get("model") or {}).get("sha256")
    if b_sha is None:
        log.warning("The basis cfg.json records no model; cannot check it matches the harvest")
    elif b_sha != h_sha:
        raise IncompatibleBasisError(
            f"The basis was fit on model {(basis_cfg.get('model') or {}).get('spec')!r} "
            f"(sha256 {b_sha[:12]}) but the harvest comes from "
            f"{(harvest_meta.get('model') or {}).get('spec')!r} (sha256 {str(h_sha)[:12]}); "
            "features only mean something on the model they were fit on."
        )
    if model_sha256 is not None and h_sha is not None and model_sha256 != h_sha:
        raise IncompatibleBasisError(
            f"The loaded model (sha256 {model_sha256[:12]}) is not the harvest's "
            f"(sha256 {h_sha[:12]}); load the model the harvest names: "
            f"{(harvest_meta.get('model') or {}).get('spec')!r}."
        )
    return hook


# --- logit lens ---------------------------------------------------------------------------------


def _centre_if_layernorm(model, directions: Tensor) -> Tensor:
    """LayerNorm removes the mean across d_model before scaling (linear); RMSNorm does not."""
    norm = str(getattr(model.cfg, "normalization_type", "") or "")
    return directions - directions.mean(-1, keepdim=True) if norm.startswith("LN") else directions


@dataclass
class Lens:
    """Top and bottom tokens of each direction's logits, and their spread."""

    top_ids: Tensor  # [n, k] most promoted, best first
    top_vals: Tensor
    bottom_ids: Tensor  # [n, k] most suppressed, most negative first
    bottom_vals: Tensor
    spread: Tensor  # [n]: mean of the top-k logits minus mean of the bottom-k

    def rows(self, idx) -> Lens:
        """A subset of directions."""
        return Lens(
            self.top_ids[idx],
            self.top_vals[idx],
            self.bottom_ids[idx],
            self.bottom_vals[idx],
            self.spread[idx],
        )


@torch.no_grad()
def lens_extremes(
    directions: Annotated[Tensor, "n d_model"],
    w: Annotated[Tensor, "d_model d_vocab"],
    k: int = 10,
    chunk: int = 256,
) -> Lens:
    """Top/bottom-k tokens of directions @ w, in chunks so thousands of features fit in memory."""
    tops, topv, bots, botv = [], [], [], []
    for s in range(0, len(directions), chunk):
        logits = directions[s : s + chunk].float() @ w
        v, i = logits.topk(k, dim=-1)
        tops.append(i)
        topv.append(v)
        v, i = logits.topk(k, dim=-1, largest=False)
        bots.append(i)
        botv.append(v)
    top_vals, bottom_vals = torch.cat(topv), torch.cat(botv)
    return Lens(
        torch.cat(tops),
        top_vals,
        torch.cat(bots),
        bottom_vals,
        top_vals.mean(-1) - bottom_vals.mean(-1),
    )


def feature_lens(model, directions: Tensor, k: int = 10, seed: int = 0) -> tuple[Lens, Lens]:
    """(the features' lens, the lens of N_CONTROL_DIRECTIONS random unit directions)."""
    w = unembedding(model)
    feats = lens_extremes(_centre_if_layernorm(model, directions.float().cpu()), w, k)
    gen = torch.Generator().manual_seed(int(seed))
    rand = random_unit_directions(N_CONTROL_DIRECTIONS, directions.shape[1], gen, torch.float32)
    return feats, lens_extremes(_centre_if_layernorm(model, rand), w, k)


# --- statistics ---------------------------------------------------------------------------------


def is_dense(freq: Annotated[Tensor, "n_features"]) -> bool:
    """Whether every feature is active almost everywhere (PCA, SVD): frequency then says nothing."""
    return bool(len(freq)) and float(freq.min()) > DENSE_FREQUENCY


def feature_order(codes: Annotated[Tensor, "n_rows n_features"]) -> list[int]:
    """Features by activation frequency, most frequent first, ties by mean code^2; dense bases
    (every feature active almost everywhere) by mean code^2 alone."""
    freq = feature_frequency(codes)
    power = codes.float().pow(2).mean(0)
    if is_dense(freq):
        return sorted(range(codes.shape[1]), key=lambda f: (-float(power[f]), f))
    return sorted(range(codes.shape[1]), key=lambda f: (-float(freq[f]), -float(power[f]), f))


def activation_histogram(values: Tensor, bins: int = 40) -> tuple[list[float], list[int]]:
    """(bin centres, counts) of the nonzero values (|v| > ACTIVE_EPS)."""
    v = values[values.abs() > ACTIVE_EPS].float()
    if len(v) == 0:
        return [], []
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts, edges = torch.histogram(v, bins=bins, range=(lo, hi))
    centres = ((edges[:-1] + edges[1:]) / 2).tolist()
    return centres, [int(c) for c in counts]


# --- labels (optional module from another part of the project) ------------------------------------


def load_labels(basis_dir: str | Path, model=None) -> dict[int, dict] | None:
    """Labels from `analoglock.bases.labels.read_labels`, or None if absent or stale (then a warning)."""
    try:
        from analoglock.bases.labels import read_labels
    except ImportError:
        return None
    try:
        labels = read_labels(basis_dir, model) if model is not None else read_labels(basis_dir)
    except FileNotFoundError:
        return None
    except ValueError as e:  # labels for another fit, hook or model: showing them would mislead
        log.warning("Not showing labels: %s", e)
        return None
    return {int(k): v for k, v in labels.items()} if labels else None


def _score(d: Any) -> float | None:
    """A detection number from a labels entry's sub-dict: AUROC if present, else 'score'."""
    if isinstance(d, dict):
        for key in ("auroc", "score"):
            if isinstance(d.get(key), int | float):
                return float(d[key])
    elif isinstance(d, int | float):
        return float(d)
    return None


def label_scores(entry: dict | None) -> tuple[str, float | None, float | None]:
    """(label, detection score, shuffled-label control score) from one labels entry."""
    if not entry:
        return "", None, None
    det = entry.get("detection")
    control = entry.get("control")
    if control is None and isinstance(det, dict):
        control = det.get("control")
    return str(entry.get("label", "")), _score(det), _score(control)


# --- rendering ----------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#eee;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ctx{font-family:ui-monospace,monospace;font-size:12.5px;white-space:pre-wrap;margin:2px 0}
.ctx .v{color:#666;display:inline-block;width:6em}mark{background:#ffd54f;padding:0 1px}
details{border:1px solid #ddd;margin:6px 0;padding:4px 8px}summary{cursor:pointer;font-weight:600}
.cols{display:flex;gap:24px;flex-wrap:wrap}.tok{font-family:ui-monospace,monospace}
.index{max-height:60vh;overflow:auto;display:inline-block}
.note{color:#555;font-size:13px;max-width:1000px}.ctl{color:#777}
"""

# Figures are drawn when their section is first opened: 200 eager plots make the page crawl.
_JS = """
function drawIn(el){el.querySelectorAll('div.fig[data-fig]').forEach(function(d){
  var f=JSON.parse(d.getAttribute('data-fig'));d.removeAttribute('data-fig');
  Plotly.newPlot(d,f.data,f.layout,{displayModeBar:false,responsive:false});});}
document.addEventListener('DOMContentLoaded',function(){
  drawIn(document.getElementById('overview'));
  document.querySelectorAll('details.feat').forEach(function(s){
    if(s.open){drawIn(s);} s.addEventListener('toggle',function(){if(s.open){drawIn(s);}});});});
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _tok_text(tokenizer, i: int) -> str:
    """A vocabulary token as readable text, spaces and newlines made visible."""
    s = tokenizer.decode([int(i)])
    return s.replace(" ", "\u2423").replace("\n", "\u21b5")


def _tokens_html(tokenizer, ids: Tensor, vals: Tensor) -> str:
    return ", ".join(
        f"<span class='tok' title='{float(v):.3g}'>{_esc(_tok_text(tokenizer, i))}</span>"
        for i, v in zip(ids.tolist(), vals.tolist(), strict=True)
    )


def context_html(c: Context) -> str:
    """One context as HTML: value, then the window with the activating token in <mark>."""
    parts = []
    for i, t in enumerate(c.tokens):
        t = _esc(t.replace("\n", "\u21b5"))
        parts.append(f"<mark>{t}</mark>" if i == c.highlight else t)
    return (
        f"<div class='ctx' title='doc {c.doc}, pos {c.pos}, row {c.row}'>"
        f"<span class='v'>{c.value:+.3g}</span>{''.join(parts)}</div>"
    )


def _fig_div(fig: go.Figure) -> str:
    return f"<div class='fig' data-fig='{_esc(fig.to_json())}'></div>"


def _hist_fig(values: Tensor, title: str) -> go.Figure:
    centres, counts = activation_histogram(values)
    fig = go.Figure(go.Bar(x=centres, y=counts, marker_color="#4a78b5"))
    fig.update_layout(
        title=title,
        width=480,
        height=240,
        margin=dict(l=40, r=10, t=36, b=30),
        xaxis_title="code",
        yaxis_title="rows",
        bargap=0.02,
    )
    return fig


def _lens_table(tokenizer, lens: Lens, ctl: Lens, norm: float) -> str:
    """Promoted/suppressed tokens of a feature beside a random direction of the same norm."""
    return (
        "<table><tr><th></th><th>feature direction</th><th class='ctl'>random direction, same norm"
        "</th></tr>"
        f"<tr><td>promotes</td><td>{_tokens_html(tokenizer, lens.top_ids, lens.top_vals)}</td>"
        f"<td class='ctl'>{_tokens_html(tokenizer, ctl.top_ids, ctl.top_vals * norm)}</td></tr>"
        f"<tr><td>suppresses</td><td>{_tokens_html(tokenizer, lens.bottom_ids, lens.bottom_vals)}"
        f"</td><td class='ctl'>{_tokens_html(tokenizer, ctl.bottom_ids, ctl.bottom_vals * norm)}"
        "</td></tr>"
        f"<tr><td>spread</td><td class='num'>{float(lens.spread):.3g}</td>"
        f"<td class='ctl num'>{float(ctl.spread) * norm:.3g}</td></tr></table>"
    )


def _labels_note(labels: dict[int, dict]) -> str:
    """One line: mean detection of the true labels vs the shuffled-label control."""
    pairs = [label_scores(e)[1:] for e in labels.values()]
    pairs = [(d, c) for d, c in pairs if d is not None and c is not None]
    if not pairs:
        return ""
    det = sum(d for d, _ in pairs) / len(pairs)
    con = sum(c for _, c in pairs) / len(pairs)
    wins = sum(d > c for d, c in pairs) / len(pairs)
    return (
        f"<p class='note'>Labels ({len(labels)} features): mean detection {det:.3f} vs "
        f"shuffled-label control {con:.3f}; the label beats its control for {wins:.0%} of "
        f"{len(pairs)} scored features.</p>"
    )


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


@torch.no_grad()
def write_dashboard(
    basis,
    acts,
    model,
    out_dir: str | Path,
    labels: dict[int, dict] | None = None,
    k: int = 10,
    n_features: int = 200,
    window: tuple[int, int] = (12, 3),
    lens_k: int = 10,
    seed: int = 0,
    title: str | None = None,
    codes: Tensor | None = None,
    progress: bool = True,
) -> Path:
    """Write the dashboard; `out_dir` is a directory (gets dashboard.html) or an .html path.

    `model` must be the model the harvest came from (its tokenizer re-tokenizes the documents and
    its unembedding gives the logit lens); `labels` is `analoglock.bases.labels.read_labels` output.
    """
    if k < 1 or n_features < 0:
        raise ValueError(f"k must be >= 1 and n_features >= 0, got k={k}, n_features={n_features}")
    out = Path(out_dir)
    out = out if out.suffix == ".html" else out / DASHBOARD_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = labels or {}
    tok = model.tokenizer

    if codes is None:
        codes = feature_codes(basis, acts, progress=progress)
    n_feat = codes.shape[1]
    freq = feature_frequency(codes)
    cmax, cmin = codes.max(0).values, codes.min(0).values
    order = feature_order(codes)
    shown = order[: min(n_features, n_feat)]

    directions = basis.directions.detach().float().cpu()
    norms = directions.norm(dim=-1)
    lens, ctl = feature_lens(model, directions, lens_k, seed)
    ctl_mean, ctl_std = float(ctl.spread.mean()), float(ctl.spread.std())
    lens_z = (lens.spread - norms * ctl_mean) / (norms * ctl_std).clamp_min(1e-12)

    tops = top_contexts(codes, acts, model, k, window, shown, progress=progress)
    signed = [f for f in shown if float(cmin[f]) < -ACTIVE_EPS]
    bottoms = top_contexts(codes, acts, model, k, window, signed, descending=False)

    hook = getattr(basis, "hook", "")
    title = title or f"{getattr(basis, 'kind', 'basis')} features at {hook}"
    has_labels = bool(labels)

    # --- overview
    # Dense bases (PCA, SVD) are active on every row: spread them by RMS code instead.
    dense = is_dense(freq)
    x_over = codes.float().pow(2).mean(0).sqrt() if dense else freq
    x_name = (
        "RMS code (dense basis: every feature is active almost everywhere)"
        if dense
        else "activation frequency"
    )
    overview = go.Figure(
        go.Scatter(
            x=x_over.tolist(),
            y=lens_z.tolist(),
            mode="markers",
            text=[f"f{f} {_esc(label_scores(labels.get(f))[0])}".strip() for f in range(n_feat)],
            hovertemplate="%{text}<br>x %{x:.3g}<br>lens z %{y:.2f}<extra></extra>",
            marker=dict(size=6, color=cmax.tolist(), colorscale="Viridis", showscale=True),
        )
    )
    overview.update_layout(
        title=f"features: {x_name.split(' (')[0]} vs logit-lens spread (z vs random directions)",
        width=900,
        height=360,
        margin=dict(l=50, r=10, t=40, b=40),
        xaxis_title=x_name,
        yaxis_title="lens spread z",
    )

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{_esc(title)}</title><style>{_CSS}</style>",
        f"<script>{get_plotlyjs()}</script><script>{_JS}</script></head><body>",
        f"<h1>{_esc(title)}</h1>",
        "<p class='note'>"
        f"{n_feat} features; {len(acts)} harvested rows from {len(acts.docs)} documents. "
        "Frequency = fraction of rows with |code| &gt; 1e-6 (dense bases such as PCA are active "
        "(almost) everywhere; they are then ordered by mean code&sup2;). Logit lens = direction &times; final "
        "norm gain @ W_U; <i>spread</i> = mean of the top-"
        f"{lens_k} minus mean of the bottom-{lens_k} logits; <i>lens z</i> compares it with "
        f"{N_CONTROL_DIRECTIONS} random directions of the same norm (control spread "
        f"{ctl_mean:.3g} &plusmn; {ctl_std:.3g} per unit norm). "
        f"Sections below: the first {len(shown)} features of the index.</p>",
        _labels_note(labels),
        f"<div id='overview'>{_fig_div(overview)}</div>",
        "<h2>Index</h2><div class='index'><table><tr><th>#</th><th>feature</th><th>frequency</th><th>max</th>"
        "<th>min</th><th>norm</th><th>lens z</th>",
    ]
    if has_labels:
        parts.append("<th>label</th><th>detection</th><th class='ctl'>shuffled control</th>")
    parts.append("<th>top promoted tokens</th></tr>")
    shown_set = set(shown)
    for rank, f in enumerate(order):
        name = f"<a href='#f{f}'>f{f}</a>" if f in shown_set else f"f{f}"
        row = (
            f"<tr><td class='num'>{rank}</td><td>{name}</td>"
            f"<td class='num'>{float(freq[f]):.4f}</td><td class='num'>{float(cmax[f]):.3g}</td>"
            f"<td class='num'>{float(cmin[f]):.3g}</td><td class='num'>{float(norms[f]):.3g}</td>"
            f"<td class='num'>{float(lens_z[f]):.2f}</td>"
        )
        if has_labels:
            lab, det, con = label_scores(labels.get(f))
            row += (
                f"<td>{_esc(lab)}</td><td class='num'>{_fmt(det)}</td>"
                f"<td class='num ctl'>{_fmt(con)}</td>"
            )
        row += f"<td>{_tokens_html(tok, lens.top_ids[f, :5], lens.top_vals[f, :5])}</td></tr>"
        parts.append(row)
    parts.append("</table></div><h2>Features</h2>")

    for j, f in enumerate(tqdm(shown, desc="render", unit="feature", disable=not progress)):
        lab, det, con = label_scores(labels.get(f))
        head = f"f{f} &middot; frequency {float(freq[f]):.4f} &middot; max {float(cmax[f]):.3g}"
        if lab:
            head += f" &middot; <i>{_esc(lab)}</i>"
        parts.append(f"<details class='feat' id='f{f}'{' open' if j == 0 else ''}>")
        parts.append(f"<summary>{head}</summary>")
        if lab:
            parts.append(
                f"<p>label <b>{_esc(lab)}</b>: detection {_fmt(det)} "
                f"<span class='ctl'>(shuffled-label control {_fmt(con)})</span></p>"
            )
        parts.append("<div class='cols'><div>")
        parts.append(f"<h4>top {k} contexts (one per document)</h4>")
        parts.extend(context_html(c) for c in tops[f])
        if f in bottoms:
            parts.append(f"<h4>most negative {k} contexts</h4>")
            parts.extend(context_html(c) for c in bottoms[f])
        parts.append("</div><div>")
        parts.append(_fig_div(_hist_fig(codes[:, f], f"f{f}: nonzero codes")))
        parts.append(
            f"<h4>logit lens (lens z {float(lens_z[f]):.2f})</h4>"
            + _lens_table(tok, lens.rows(f), ctl.rows(f % N_CONTROL_DIRECTIONS), float(norms[f]))
        )
        parts.append("</div></div></details>")
    parts.append("</body></html>")
    write_text(out, "\n".join(parts))
    return out
