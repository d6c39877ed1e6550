"""Anomaly triggers: one battery of measurements over the concept sets, ranked by surprise.

Owns the battery and the ranking. Every measurement has its own null distribution, and its
surprise is a robust z-score (value - null median) / (1.4826 * null MAD), ranked by |z| so a
researcher looks first where the numbers least resemble their controls:
  cosine       relation-vector cosines vs shuffled labels;
  norm         relation-vector norms vs labels swapped within matched items;
  orthogonality |cosine| vs random directions of the space (the concept rows' covariance);
  sparsity     Hoyer sparsity of a relation vector's codes in the basis vs random equal-norm directions;
  separability held-out accuracy of the mean-difference direction vs shuffled labels, and (when
               the separability analysis ran first) each causal matrix entry vs its random controls;
  effect size  the largest |Cohen's d| of any basis feature between a class and the rest vs the
               same maximum under shuffled labels.
Knows nothing of reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from analoglock.relations.algebra import (
    all_relations,
    cosine_matrix,
    null_relations,
    relation_matrix,
    shuffle_labels,
    space_abs_cosines,
)
from analoglock.relations.common import basis_at, concept_rows, svd_basis
from analoglock.relations.config import AnomaliesConfig, settings
from analoglock.relations.context import ConceptActs, RelationsContext
from analoglock.relations.hierarchy import DEFAULT_N_FEATURES, cohens_d
from analoglock.relations.vectors import concept_vectors
from analoglock.stats import empirical_p, random_unit_directions

MAD_SCALE = 1.4826  # makes the MAD a consistent sd estimate under normality


def robust_z(value: float, null: Tensor) -> float:
    """(value - median) / (1.4826 MAD) of the null; falls back to the sd when the MAD is zero."""
    null = null.double().flatten()
    med = float(null.median())
    mad = MAD_SCALE * float((null - med).abs().median())
    scale = mad if mad > 1e-12 else float(null.std()) if null.numel() > 1 else 0.0
    if scale <= 1e-12:
        return 0.0 if abs(value - med) <= 1e-12 else math.copysign(float("inf"), value - med)
    return (value - med) / scale


def hoyer(x: Tensor) -> Tensor:
    """Hoyer sparsity per row: 0 for a flat vector, 1 for a one-hot one."""
    n = x.shape[-1]
    ratio = x.abs().sum(-1) / x.norm(dim=-1).clamp_min(1e-12)
    return (math.sqrt(n) - ratio) / (math.sqrt(n) - 1)


# what each kind's null is, written beside every row of that kind
NULLS = {
    "norm": "class labels swapped within matched items",
    "cosine": "class labels shuffled across rows",
    "orthogonality": "random directions of the space (the concept rows' covariance)",
    "sparsity": "isotropic random directions",
    "effect size": "class labels shuffled across train rows",
    "separability": "class labels shuffled across rows",
    "causal separability": "isotropic random pushes of the contrast vector's norm",
}


def _entry(
    kind: str, target: str, hook: str, value: float, null: Tensor, two_sided: bool = True
) -> dict[str, Any]:
    """One battery row with its null summary, robust z and empirical p."""
    z = robust_z(value, null)
    med = float(null.double().median())
    dev = (null.double() - med).abs()
    p = empirical_p(abs(value - med), dev) if two_sided else empirical_p(value, null.double())
    return {
        "kind": kind,
        "target": target,
        "hook": hook,
        "null": NULLS[kind],
        "value": value,
        "null_median": med,
        "null_n": int(null.numel()),
        "robust_z": z,
        "p": p,
    }


def battery(
    concepts: Mapping[str, ConceptActs],
    hook: str,
    basis=None,
    separability: Mapping[str, Any] | None = None,
    n_null: int = 200,
    n_random: int = 500,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Every measurement of the battery at one hook (unranked)."""
    gen = torch.Generator().manual_seed(seed)
    specs = all_relations(dict(concepts))
    items = {n: ca.items_tensor(hook).double() for n, ca in concepts.items()}
    classes = {n: ca.classes for n, ca in concepts.items()}
    obs = relation_matrix(items, classes, specs)
    null = null_relations(items, classes, specs, n_null, gen)
    paired = null_relations(items, classes, specs, n_null, gen, paired=True)
    labels = [s.label for s in specs]
    rows: list[dict[str, Any]] = []
    cos, cnull = cosine_matrix(obs), cosine_matrix(null)
    rows_all = torch.cat([ca.stacked(hook)[0] for ca in concepts.values()])
    rnd = space_abs_cosines(rows_all, n_random, gen)
    for i in range(len(specs)):
        rows.append(
            _entry("norm", labels[i], hook, float(obs[i].norm()), paired[:, i].norm(dim=-1))
        )
        for j in range(i + 1, len(specs)):
            pair = f"{labels[i]} ~ {labels[j]}"
            rows.append(_entry("cosine", pair, hook, float(cos[i, j]), cnull[:, i, j]))
            rows.append(_entry("orthogonality", pair, hook, float(cos[i, j].abs()), rnd))
    basis = basis_at(basis, hook) or svd_basis(
        concept_rows(concepts, hook), DEFAULT_N_FEATURES, hook
    )
    dirs = basis.directions.double()
    rand_dirs = random_unit_directions(n_random, obs.shape[-1], gen)  # Hoyer is scale-free
    rand_sparsity = hoyer(rand_dirs @ dirs.T)
    for i in range(len(specs)):
        rows.append(
            _entry("sparsity", labels[i], hook, float(hoyer(obs[i] @ dirs.T)), rand_sparsity)
        )
    for name, ca in concepts.items():
        x = ca.items_tensor(hook)
        codes = basis.encode(x.float()).double()
        tr = ca.split_mask("train")
        for k, c in enumerate(ca.classes):
            rest = [j for j in range(len(ca.classes)) if j != k]

            def max_d(t: Tensor, k=k, rest=rest) -> float:
                return float(cohens_d(t[:, k], t[:, rest].mean(1)).abs().max())

            nd = torch.tensor(
                [max_d(shuffle_labels(codes[tr], gen)) for _ in range(min(n_null, 100))]
            )
            rows.append(
                _entry(
                    "effect size",
                    f"{name}:{c}-rest max|d| over features",
                    hook,
                    max_d(codes[tr]),
                    nd,
                    False,
                )
            )
            if len(ca.classes) == 2 and k == 1:
                continue  # the binary contrast is the same as k == 0 mirrored
            cv = concept_vectors(
                ca, hook, c, None, n_null=min(n_null, 100), seed=seed + k, methods=("mean_diff",)
            )
            acc = cv["methods"]["mean_diff"]["heldout_accuracy"]
            rows.append(
                _entry(
                    "separability",
                    f"{name}:{c}-rest held-out accuracy",
                    hook,
                    acc,
                    cv["_null"]["mean_diff"],
                    False,
                )
            )
    if separability:
        lab = separability["labels"]
        S = torch.tensor(separability["matrix"])
        ctrl = torch.tensor(separability.get("random_control_matrix_mean") or []).flatten()
        if ctrl.numel() > 1:
            for i, a in enumerate(lab):
                for j, b in enumerate(lab):
                    rows.append(
                        _entry(
                            "causal separability",
                            f"push {a} -> read {b}",
                            hook,
                            float(S[i, j]),
                            ctrl,
                        )
                    )
    return rows


def rank(rows: list[dict[str, Any]], top: int | None = None) -> list[dict[str, Any]]:
    """Rows sorted by |robust z| (largest first), numbered."""
    ordered = sorted(rows, key=lambda r: -abs(r["robust_z"]))
    ordered = ordered[:top] if top else ordered
    return [dict(r, rank=k + 1) for k, r in enumerate(ordered)]


def run(cfg, ctx: RelationsContext) -> dict[str, Any]:
    """The battery at every hook (`AnomaliesConfig`), ranked; reuses the separability results
    when that analysis ran."""
    c = settings(cfg, AnomaliesConfig)
    sep = (ctx.results.get("separability") or {}).get("by_hook", {})
    rows = []
    for hook in ctx.hooks:
        rows += battery(
            ctx.concepts, hook, ctx.basis, sep.get(hook), c.n_null, c.n_random, seed=ctx.seed
        )
    ranked = rank(rows)
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    return {
        "n_measurements": len(rows),
        "rule": "robust z = (value - null median) / (1.4826 * null MAD); ranked by |z|",
        "nulls": {k: NULLS[k] for k in kinds},
        "ranked": ranked[: c.top],
        # Kinds differ in scale (any real concept beats a shuffled-label effect-size null by far),
        # so the top of each kind is listed too.
        "top_by_kind": {k: [r for r in ranked if r["kind"] == k][:5] for k in kinds},
        "counts_by_kind": {k: sum(r["kind"] == k for r in rows) for k in kinds},
    }
