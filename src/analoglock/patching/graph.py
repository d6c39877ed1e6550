"""The feature graph: nodes (features with logit-lens tokens and labels), edges (effects with controls).

Owns turning `Effects` into `graph.json`: one node per feature at either end of a kept edge
({id, side, layer, hook, basis, feature, tokens, suppressed, label, activation, importance}) and
one edge per kept pair ({source, target, effect, control, attribution, attribution_control,
beats_control: |effect| above its own control and the controls' 95th percentile, p_control: the
empirical p of |effect| against every pair's control pooled; `beats_control`,
`control_contrast` for the paired per-feature comparison); pruning by
node importance (mean |code| on the prompt set, or total |effect|) as quantile thresholds plus
the strongest `edges`; and the threshold study that says what pruning costs. Knows nothing of how effects were computed beyond the `Effects` it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef

from analoglock.patching.exact import Effects
from analoglock.stats import bootstrap_mean, empirical_p

log = logging.getLogger(__name__)

# An edge "beats control" when |effect| exceeds both its own control (the same intervention along
# an equal-norm random direction) and this quantile of |control| over all pairs (the noise floor).
CONTROL_QUANTILE = 0.95


def control_floor(control: Tensor) -> float:
    """The noise floor edges must clear: the CONTROL_QUANTILE of |control| over all pairs."""
    return float(torch.quantile(control.abs().flatten().double(), CONTROL_QUANTILE))


def beats_control(effect: Tensor, control: Tensor) -> Tensor:
    """Bool [n_up, n_down]: |effect| above its own |control| and above `control_floor(control)`."""
    floor = torch.tensor(control_floor(control), dtype=torch.float64)
    return effect.abs().double() > torch.maximum(control.abs().double(), floor)


def control_contrast(
    effect: Annotated[Tensor, "n_up n_down"],
    control: Annotated[Tensor, "n_up n_down"],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Each upstream feature's effect against its own random-direction control, paired.

    Per upstream feature i (the items: independent interventions), the paired difference
    mean_j |effect[i, j]| - mean_j |control[i, j]| (the same ablation, along an equal-norm random
    direction), its mean over features and `stats.bootstrap_mean` interval; how many features
    have a positive difference; and how many pairs (edges) pass `beats_control`, the rule
    graph.json's edges use.
    """
    if effect.shape != control.shape or effect.ndim != 2:
        raise ValueError(
            f"Need effect and control of one [n_up, n_down] shape, got {tuple(effect.shape)} "
            f"and {tuple(control.shape)}"
        )
    diff = effect.abs().double().mean(1) - control.abs().double().mean(1)
    mean, lo, hi = bootstrap_mean(diff, n_boot=n_boot, seed=seed, level=level)
    return {
        "n_upstream": int(effect.shape[0]),
        "n_downstream": int(effect.shape[1]),
        "effect_minus_control_mean": mean,
        "effect_minus_control_ci": [lo, hi],
        "n_upstream_effect_above_control": int((diff > 0).sum()),
        "n_edges": int(effect.numel()),
        "n_edges_beating_control": int(beats_control(effect, control).sum()),
        "control_floor": control_floor(control),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "level": float(level),
    }


@dataclass(frozen=True)
class Thresholds:
    """Node thresholds as quantiles in [0, 1) of each side's importance, and the edge budget."""

    activation: float = 0.0  # keep features whose mean |code| is at least this quantile
    effect: float = 0.0  # keep features whose total |effect| is at least this quantile
    edges: int = 200  # then keep this many strongest edges

    def __post_init__(self) -> None:
        for name in ("activation", "effect"):
            q = float(getattr(self, name))
            if not 0.0 <= q < 1.0:
                raise ValueError(f"threshold.{name} is a quantile in [0, 1), got {q}")
        if int(self.edges) < 1:
            raise ValueError(f"threshold.edges must be >= 1, got {self.edges}")


@torch.no_grad()
def promoted_tokens(
    model, directions: Annotated[Tensor, "n d_model"], k: int = 5
) -> tuple[list[list[str]], list[list[str]]]:
    """Logit lens of each direction (final norm, unembedding): the k most promoted and suppressed tokens."""
    dirs = directions.detach().to(model.cfg.device, torch.float32)
    top, bottom = [], []
    for chunk in dirs.split(256):  # [256, d_vocab] logits at a time
        logits = model.unembed(model.ln_final(chunk[:, None, :]))[:, 0]
        top += logits.topk(k, dim=-1).indices.tolist()
        bottom += (-logits).topk(k, dim=-1).indices.tolist()
    decode = model.tokenizer.decode
    return [[decode([t]) for t in row] for row in top], [
        [decode([t]) for t in row] for row in bottom
    ]


def read_labels_or_none(basis_dir: str | Path | None) -> dict[int, dict] | None:
    """labels.json of a basis directory when there is one (analoglock.bases.labels), else None."""
    if basis_dir is None:
        return None
    try:
        from analoglock.bases.labels import read_labels
    except ImportError:
        return None
    try:
        return read_labels(basis_dir)
    except FileNotFoundError:
        return None
    except ValueError as err:  # stale or mismatched labels: say so, draw the graph without them
        log.warning("Ignoring labels in %s: %s", basis_dir, err)
        return None


def _quantile_keep(score: Tensor, q: float) -> Tensor:
    """Mask of entries whose score is at least the q-quantile (all when q == 0)."""
    if q <= 0 or len(score) == 0:
        return torch.ones(len(score), dtype=torch.bool)
    return score >= torch.quantile(score.double(), q).to(score.dtype)


def primary(effects: dict[str, Effects]) -> Effects:
    """The effects edges are ranked by: exact when present, else attribution."""
    return effects.get("exact") or effects["attribution"]


def keep_nodes(
    primary_effect: Tensor, act_up: Tensor, act_down: Tensor, th: Thresholds
) -> tuple[Tensor, Tensor]:
    """Boolean masks of kept upstream rows and downstream columns."""
    imp_up, imp_down = primary_effect.abs().sum(1), primary_effect.abs().sum(0)
    up = _quantile_keep(act_up, th.activation) & _quantile_keep(imp_up, th.effect)
    down = _quantile_keep(act_down, th.activation) & _quantile_keep(imp_down, th.effect)
    return up, down


def strongest_edges(score: Tensor, up: Tensor, down: Tensor, n: int) -> list[tuple[int, int]]:
    """(row, column) of the n largest |score| among kept rows and columns, strongest first."""
    masked = score.abs().masked_fill(~(up[:, None] & down[None, :]), -1.0)
    n = min(int(n), int((masked >= 0).sum()))
    flat = masked.flatten().topk(n).indices
    return [(int(i) // score.shape[1], int(i) % score.shape[1]) for i in flat]


def _spearman(a: Tensor, b: Tensor) -> float | None:
    """Spearman correlation, None when undefined (fewer than 3 pairs or a constant side)."""
    if len(a) < 3 or float(a.double().std()) == 0 or float(b.double().std()) == 0:
        return None
    return round(float(spearman_corrcoef(a.double(), b.double())), 4)


def threshold_study(
    effects: dict[str, Effects],
    act_up: Tensor,
    act_down: Tensor,
    quantiles: Sequence[float] = (0.0, 0.5, 0.75, 0.9),
    edges: int = 200,
) -> dict[str, Any]:
    """What node pruning does to the graph, per criterion (activation / effect) and quantile.

    Per row: nodes and pairs kept; the share of the unpruned graph's strongest `edges` edges that
    survive; Spearman of attribution vs exact over the kept pairs (when both exist); and the
    Jaccard overlap of the edge sets the two criteria keep at the same quantile. Also the rank
    correlation of the two node importances (mean |code| vs total |effect|), which says whether
    pruning by activation approximates pruning by effect.
    """
    e = primary(effects).effect
    full = set(strongest_edges(e, *(torch.ones(n, dtype=torch.bool) for n in e.shape), edges))
    rows, kept_sets = [], {}
    for crit in ("activation", "effect"):
        for q in quantiles:
            th = Thresholds(**{crit: q, "edges": edges})
            up, down = keep_nodes(e, act_up, act_down, th)
            pairs = up[:, None] & down[None, :]
            top = set(strongest_edges(e, up, down, edges))
            kept_sets[(crit, q)] = top
            row = {
                "criterion": crit,
                "quantile": q,
                "upstream_kept": int(up.sum()),
                "downstream_kept": int(down.sum()),
                "pairs_kept": int(pairs.sum()),
                "top_edges_surviving": round(len(top & full) / max(1, len(full)), 4),
            }
            if "exact" in effects and "attribution" in effects:
                row["spearman_attr_vs_exact"] = _spearman(
                    effects["attribution"].effect[pairs], effects["exact"].effect[pairs]
                )
            rows.append(row)
    jaccard = {}
    for q in quantiles:
        a, b = kept_sets[("activation", q)], kept_sets[("effect", q)]
        jaccard[str(q)] = round(len(a & b) / max(1, len(a | b)), 4)
    return {
        "rows": rows,
        "edge_jaccard_activation_vs_effect": jaccard,
        "node_rank_corr_activation_vs_effect": {
            "upstream": _spearman(act_up, e.abs().sum(1)),
            "downstream": _spearman(act_down, e.abs().sum(0)),
        },
    }


def _node(side: str, hook: str, basis_name: str, fid: int, **extra: Any) -> dict[str, Any]:
    """One node record."""
    from analoglock.hooks import hook_layer

    tag = "U" if side == "upstream" else "D"
    return {
        "id": f"{tag}{hook_layer(hook)}:{fid}",
        "side": side,
        "layer": hook_layer(hook),
        "hook": hook,
        "basis": basis_name,
        "feature": fid,
        **extra,
    }


def build_graph(
    model,
    upstream,
    downstream,
    effects: dict[str, Effects],
    act_up: Annotated[Tensor, "n_up"],
    act_down: Annotated[Tensor, "n_down"],
    thresholds: Thresholds | None = None,
    upstream_dir: str | Path | None = None,
    downstream_dir: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    n_tokens: int = 5,
) -> dict[str, Any]:
    """graph.json: kept nodes and strongest edges, every edge with its control(s)."""
    if not effects:
        raise ValueError("build_graph needs at least one of exact / attribution effects")
    thresholds = thresholds or Thresholds()
    main = primary(effects)
    e = main.effect
    up_keep, down_keep = keep_nodes(e, act_up, act_down, thresholds)
    edges = strongest_edges(e, up_keep, down_keep, thresholds.edges)
    used_up = sorted({i for i, _ in edges})  # the graph's nodes are the edges' ends
    used_down = sorted({j for _, j in edges})
    controls = main.control
    floor = control_floor(controls) if controls is not None else None
    beats = beats_control(e, controls) if controls is not None else None
    null = controls.abs().flatten().double() if controls is not None else None
    nodes = []
    for side, basis, ids, rows, act, imp, bdir in (
        ("upstream", upstream, main.upstream, used_up, act_up, e.abs().sum(1), upstream_dir),
        (
            "downstream",
            downstream,
            main.downstream,
            used_down,
            act_down,
            e.abs().sum(0),
            downstream_dir,
        ),  # fmt: skip
    ):
        fids = ids[rows]
        dirs = getattr(basis, "directions", None)
        promoted, suppressed = (
            promoted_tokens(model, dirs[fids], n_tokens) if dirs is not None else ([], [])
        )
        names = getattr(basis, "labels", None)  # TokenLogits names its codes by token
        labels = read_labels_or_none(bdir)
        for k, (r, f) in enumerate(zip(rows, fids.tolist(), strict=True)):
            label = (labels or {}).get(f, {}).get("label") if labels else None
            if label is None and isinstance(names, list):
                label = names[f]
            nodes.append(
                _node(
                    side,
                    basis.hook,
                    str(bdir or type(basis).__name__),
                    f,
                    tokens=promoted[k] if promoted else [],
                    suppressed=suppressed[k] if suppressed else [],
                    label=label,
                    activation=round(float(act[r]), 6),
                    importance=round(float(imp[r]), 6),
                )
            )
    id_up = {r: _node("upstream", upstream.hook, "", int(main.upstream[r]))["id"] for r in used_up}
    id_down = {
        c: _node("downstream", downstream.hook, "", int(main.downstream[c]))["id"]
        for c in used_down
    }
    edge_records = []
    for i, j in edges:
        rec: dict[str, Any] = {"source": id_up[i], "target": id_down[j]}
        for name, eff in effects.items():
            key = "effect" if name == "exact" else name
            rec[key] = round(float(eff.effect[i, j]), 7)
            if eff.control is not None:
                rec["control" if name == "exact" else f"{name}_control"] = round(
                    float(eff.control[i, j]), 7
                )
        if floor is not None:
            rec["beats_control"] = bool(beats[i, j])
            rec["p_control"] = round(empirical_p(abs(float(e[i, j])), null), 6)
        edge_records.append(rec)
    return {
        **(meta or {}),
        "upstream": {
            "hook": upstream.hook,
            "basis": str(upstream_dir),
            "n_features": int(upstream.n_features),
        },  # fmt: skip
        "downstream": {
            "hook": downstream.hook,
            "basis": str(downstream_dir),
            "n_features": int(downstream.n_features),
        },  # fmt: skip
        "methods": {name: eff.to_dict() for name, eff in effects.items()},
        "ranked_by": main.method,
        "thresholds": {
            "activation": thresholds.activation,
            "effect": thresholds.effect,
            "edges": thresholds.edges,
        },  # fmt: skip
        "control_floor": floor,
        "control_floor_quantile": CONTROL_QUANTILE,
        "control_null": None
        if null is None
        else {
            "what": "|effect| of the same intervention along an isotropic random direction of "
            "equal norm, pooled over every (upstream, downstream) pair",
            "n_draws": len(null),
            "n_directions": int(len(main.upstream)),  # draws of one row share its direction
            "p_control": "(1 + #null >= |effect|) / (1 + n_draws), one-sided",
        },
        "nodes": nodes,
        "edges": edge_records,
    }


@torch.no_grad()
def node_activations(upstream, downstream, cleans) -> tuple[Tensor, Tensor]:
    """Mean |code| of every upstream feature over intervention positions and every downstream
    feature over measure positions, pooled over the prompt set."""
    a = torch.cat([upstream.encode(c.x1)[c.intervene] for c in cleans]).abs().mean(0)
    b = torch.cat([downstream.encode(c.x2)[c.measure] for c in cleans]).abs().mean(0)
    return a.float().cpu(), b.float().cpu()
