"""Score maps on held-out pairs, item by item, beside the closed-form baselines.

Owns what the lock is judged on: for each view group (story, roles, mentions) and each held-out
pair, whether M(a_i) retrieves its own partner b_i first among the group's B rows (top-1, ties
counted fractionally), its reciprocal rank, and its relation error (how far the differences
between M(a_i) and the other mapped rows are from the same differences among the B rows). Item
level values let every comparison be paired and bootstrapped. Baselines are the maps a reader
would try first: identity, the mean difference (CAA), orthogonal Procrustes, and ridge least
squares pulled toward the identity. Knows nothing of Lightning; the module and `train` call it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from analoglock.lock.maps.baselines import least_squares_affine, mean_difference, procrustes
from analoglock.paired import PairedActivations, view_group
from analoglock.stats import EPS, bootstrap_mean

MapFn = Callable[..., Tensor]  # baselines take (x, part): they are fit per view group
BASELINES = ("identity", "meandiff", "procrustes", "ridge")
GROUPS = ("story", "roles", "mentions")
ASSIGN = "assign"  # within-pair role assignment (`assignment_ranks`), scored beside the groups


def partner_ranks(
    mapped_a: Annotated[Tensor, "n d"], b: Annotated[Tensor, "n d"]
) -> tuple[Annotated[Tensor, "n"], Annotated[Tensor, "n"]]:
    """(top-1 hit, reciprocal rank) of each row's own partner among all b rows, by cosine.

    A partner tied with t others at rank r counts 1/(t+1) toward top-1 (a collapsed map that sends
    every row to one point scores chance, not 1) and 1/(r + t/2) as its reciprocal rank.
    """
    a = F.normalize(mapped_a.detach().double(), dim=-1)
    bn = F.normalize(b.detach().double(), dim=-1)
    sims = a @ bn.T
    own = sims.diagonal().unsqueeze(1)
    better = (sims > own).sum(1).double()
    ties = (sims == own).sum(1).double() - 1
    hit = torch.where(better == 0, 1 / (ties + 1), torch.zeros_like(better))
    return hit, 1 / (1 + better + ties / 2)


def relation_errors(
    mapped_a: Annotated[Tensor, "n d"], b: Annotated[Tensor, "n d"]
) -> Annotated[Tensor, "n"]:
    """Each row's share of the all-pairs relation error, normalised by B's relation spread.

    With u_i = M(a_i) - b_i, the error of pair (i, j) is ||u_i - u_j||^2, and summing over all
    pairs gives 2n sum_i ||u_i - mean u||^2: row i's share is ||u_i - mean u||^2. The mean over
    rows equals `losses.relation_preservation` (0 = relations carried over exactly, ~1 = the map
    collapses them, ~2 = scrambled). A translation cannot change it.
    """
    u = (mapped_a - b).double()
    bb = b.double()
    scale = (bb - bb.mean(0)).pow(2).sum(-1).mean().clamp_min(EPS)
    return (u - u.mean(0)).pow(2).sum(-1) / scale


def baseline_maps(train: PairedActivations, ridge: float = 1.0) -> dict[str, MapFn]:
    """Closed-form maps fit on the train pairs: identity, mean difference, Procrustes, ridge.

    Each is fit per view group (story rows on story rows, role rows on role rows, ...) and applied
    to held-out rows of the same group: the strongest version of each baseline, so a learned map
    that mixes groups has no easy win (one mean difference over all rows would be dominated by
    the many mention rows and understate the story-level domain shift).
    """
    groups = [view_group(v) for v in train.view]
    fitted: dict[str, dict[str, MapFn]] = {"meandiff": {}, "procrustes": {}, "ridge": {}}
    for g in sorted(set(groups)):
        rows = torch.tensor([x == g for x in groups])
        a, b = train.a[rows], train.b[rows]
        r = mean_difference(a, b)
        fitted["meandiff"][g] = lambda x, r=r: x + r
        if len(a) >= 2:
            R, mu_a, mu_b = procrustes(a, b)
            W, c = least_squares_affine(a, b, ridge=ridge)
            fitted["procrustes"][g] = lambda x, R=R, mu_a=mu_a, mu_b=mu_b: (x - mu_a) @ R + mu_b
            fitted["ridge"][g] = lambda x, W=W, c=c: x @ W + c

    def per_group(name: str) -> MapFn:
        def apply(x: Tensor, part: PairedActivations) -> Tensor:
            out = x.clone()
            for g, fn in fitted[name].items():
                rows = torch.tensor([view_group(v) == g for v in part.view], dtype=torch.bool)
                if rows.any():
                    out[rows] = fn(x[rows]).to(x.dtype)
            return out

        return apply

    return {"identity": lambda x, part: x, **{name: per_group(name) for name in fitted}}


def assignment_ranks(
    mapped_a: Annotated[Tensor, "n d"], b: Annotated[Tensor, "n d"], pair: list[str]
) -> tuple[Annotated[Tensor, "m"], Annotated[Tensor, "m"], Annotated[Tensor, "m"]]:
    """Within each pair: (hit, reciprocal rank, chance) of a role's own partner among the B roles
    of the SAME pair, after centring the pair's mapped A roles and its B roles on their own means.

    This is the analogy itself, the tortoise -> the junior analyst rather than the hare -> the
    analyst, with the story already known: retrieval among all held-out roles mixes it with
    telling stories apart. Centring per pair removes any shift shared by the pair's roles, so
    identity, the mean difference and every translation score the same here; only a map that
    changes role-to-role structure can move it. Pairs with one role are left out (m <= n).
    """
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(pair):
        rows.setdefault(p, []).append(i)
    hits, rrs, chance = [], [], []
    for idx in rows.values():
        if len(idx) < 2:
            continue
        q, c = mapped_a[idx].double(), b[idx].double()
        hit, rr = partner_ranks(q - q.mean(0), c - c.mean(0))
        hits.append(hit)
        rrs.append(rr)
        chance.append(torch.full_like(hit, 1.0 / len(idx)))
    if not hits:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty, empty
    return torch.cat(hits), torch.cat(rrs), torch.cat(chance)


def score_items(
    mapped_a: Tensor, part: PairedActivations, center: Tensor
) -> dict[str, dict[str, Tensor]]:
    """Per view group: per-row "hit", "rr" and "rel_err" (candidates = that group's rows only);
    and for roles, "assign": `assignment_ranks` within each pair ("hit", "rr", "chance").

    Similarities are taken after subtracting `center` (the mean training activation): the
    residual stream's large shared component would otherwise make every cosine near 1.
    """
    groups = [view_group(v) for v in part.view]
    out: dict[str, dict[str, Tensor]] = {}
    for g in GROUPS:
        rows = torch.tensor([x == g for x in groups], dtype=torch.bool)
        if int(rows.sum()) < 2:
            continue
        m, bc = mapped_a[rows] - center, part.b[rows] - center
        hit, rr = partner_ranks(m, bc)
        out[g] = {"hit": hit, "rr": rr, "rel_err": relation_errors(m, bc)}
        if g == "roles":
            pairs = [p for p, keep in zip(part.pair, rows.tolist(), strict=True) if keep]
            hit, rr, chance = assignment_ranks(m, bc, pairs)
            if len(hit):
                out[ASSIGN] = {"hit": hit, "rr": rr, "chance": chance}
    return out


def summarize(items: dict[str, dict[str, Tensor]]) -> dict[str, float]:
    """Means per group: top1_<g>, mrr_<g>, equivariance_<g> (where defined), n_<g>; and
    chance_<g> for the within-pair assignment."""
    out: dict[str, float] = {}
    for g, v in items.items():
        out[f"top1_{g}"] = float(v["hit"].mean())
        out[f"mrr_{g}"] = float(v["rr"].mean())
        if "rel_err" in v:
            out[f"equivariance_{g}"] = float(v["rel_err"].mean())
        if "chance" in v:
            out[f"chance_{g}"] = float(v["chance"].mean())
        out[f"n_{g}"] = len(v["hit"])
    return out


def margins(
    learned: dict[str, dict[str, Tensor]],
    baselines: dict[str, dict[str, dict[str, Tensor]]],
    groups: tuple[str, ...] = ("story", "roles"),
    seed: int = 0,
) -> dict[str, list[float]]:
    """Paired bootstrap intervals of (learned - baseline) per held-out item.

    Keys `top1_<group>_vs_<baseline>` -> [mean, lo, hi] of the top-1 difference (positive: the
    learned map retrieves more partners), and `rel_err_<group>_vs_identity` -> [mean, lo, hi] of
    the relation-error difference (negative: relations are carried over better than identity).
    """
    out: dict[str, list[float]] = {}
    for g in groups:
        if g not in learned:
            continue
        for name, items in baselines.items():
            if g in items:
                diff = learned[g]["hit"] - items[g]["hit"]
                out[f"top1_{g}_vs_{name}"] = list(bootstrap_mean(diff, seed=seed))
        if "identity" in baselines and "rel_err" in baselines["identity"].get(g, {}):
            diff = learned[g]["rel_err"] - baselines["identity"][g]["rel_err"]
            out[f"rel_err_{g}_vs_identity"] = list(bootstrap_mean(diff, seed=seed))
    return out


def evaluate_maps(
    maps: dict[str, MapFn | torch.nn.Module], part: PairedActivations, center: Tensor
) -> dict[str, dict[str, dict[str, Tensor]]]:
    """`score_items` for each named map on the same held-out rows.

    A map is a module (applied to every row alike) or a baseline taking (x, part).
    """
    out = {}
    with torch.no_grad():
        for name, fn in maps.items():
            mapped = fn(part.a) if isinstance(fn, torch.nn.Module) else fn(part.a, part)
            out[name] = score_items(mapped, part, center)
    return out


@torch.no_grad()
def relation_features(mapper, a: Tensor, k: int = 10, labels: dict | None = None) -> list[dict]:
    """For a map in a feature basis: the features it moves most, encode(a) -> encode(a) W + b.

    Weighted by each feature's decoder norm, so the ranking is in activation units. Read it beside
    the same readout of the shuffled-pairs control: features that move as much there are the
    domain-mean shift, not the analogy.
    """
    codes = mapper.basis_a.encode(a)
    delta = (codes @ mapper.W_feat + mapper.b_feat).mean(0) - codes.mean(0)
    basis_b = mapper.basis_b
    norms = basis_b.directions.norm(dim=-1) if hasattr(basis_b, "directions") else 1
    score = delta * norms
    top = score.abs().topk(min(k, len(score))).indices
    return [
        {
            "feature": int(i),
            "code_change": float(delta[i]),
            "activation_change": float(score[i]),
            "label": (labels or {}).get(int(i), {}).get("label"),
        }
        for i in top
    ]
