"""Comparing two saved bases: one-to-one matching and "few vs many" decomposition, with controls.

For a narrow basis (the few: e.g. SVD-32) and a wide one (the many: e.g. an SAE with thousands
of latents) on the same hook, each wide feature is written as a sparse combination of the narrow
ones (`matching.decomposition_matrix`), so a user sees which general feature a specific one splits
from. Random unit directions decomposed the same way are the control: in d dimensions k directions
explain a random direction's cosine of about sqrt(k / d) by chance, and only wide features well above
that are "built from the few". Plain functions returning JSON-ready dicts; the CLI writes the report.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from analoglock.bases.matching import decomposition_matrix, match_features
from analoglock.stats import random_unit_directions

ACTIVE_COEF = 1e-6  # |coefficient| above this counts as a parent


def explained_cosine(
    coefs: Annotated[Tensor, "m k"], few: Annotated[Tensor, "k d"], many: Annotated[Tensor, "m d"]
) -> Annotated[Tensor, "m"]:
    """Cosine between each many-direction and its reconstruction from the few."""
    return F.cosine_similarity((coefs.double() @ few.double()), many.double(), dim=-1).float()


def control_directions(n: int, d: int, seed: int) -> Annotated[Tensor, "n d"]:
    """Isotropic random unit vectors (float32, seeded): the control for "how much do the few
    explain by chance" (`stats.random_unit_directions`)."""
    return random_unit_directions(n, d, torch.Generator().manual_seed(seed), torch.float32)


def decompose(
    few_dirs: Tensor, many_dirs: Tensor, l1: float = 0.05, steps: int = 500, seed: int = 0
) -> dict[str, Any]:
    """Coefficients, explained cosines and parent counts for each many-feature, beside random controls."""
    few = F.normalize(few_dirs.float(), dim=-1)
    many = F.normalize(many_dirs.float(), dim=-1)
    coefs = decomposition_matrix(few, many, l1=l1, steps=steps)
    control_dirs = control_directions(len(many), many.shape[1], seed)
    control_coefs = decomposition_matrix(few, control_dirs, l1=l1, steps=steps)
    explained = explained_cosine(coefs, few, many)
    control = explained_cosine(control_coefs, few, control_dirs)
    threshold = float(torch.quantile(control, 0.95))
    return {
        "coefs": coefs,
        "explained": explained,
        "explained_control": control,
        "control_q95": threshold,
        "n_parents": (coefs.abs() > ACTIVE_COEF).sum(-1),
        "built_from_few": explained > threshold,
    }


def children_of(coefs: Tensor, built: Tensor, top: int = 8) -> dict[int, list[tuple[int, float]]]:
    """For each few-feature, the many-features whose strongest parent it is, strongest first."""
    parent = coefs.abs().argmax(-1)
    weight = coefs.gather(1, parent[:, None]).squeeze(1)
    out: dict[int, list[tuple[int, float]]] = {}
    for j in torch.nonzero(built).flatten().tolist():
        out.setdefault(int(parent[j]), []).append((j, float(weight[j])))
    return {i: sorted(kids, key=lambda t: -abs(t[1]))[:top] for i, kids in sorted(out.items())}


def compare_bases(
    few, many, l1: float = 0.05, steps: int = 500, seed: int = 0, top_children: int = 8
) -> dict[str, Any]:
    """Matching summary and few->many decomposition of two fitted bases (few has fewer features)."""
    if few.n_features > many.n_features:
        raise ValueError(
            f"'few' has {few.n_features} features and 'many' {many.n_features}: pass the narrower "
            "basis as few (the decomposition writes each of the many as a combination of the few)"
        )
    if few.directions.shape[1] != many.directions.shape[1]:
        raise ValueError(
            f"bases live in different spaces: d_model {few.directions.shape[1]} vs "
            f"{many.directions.shape[1]}"
        )
    match = match_features(few.directions, many.directions)
    control_match = match_features(
        few.directions, control_directions(many.n_features, many.directions.shape[1], seed)
    )
    dec = decompose(few.directions, many.directions, l1=l1, steps=steps, seed=seed)
    return {
        "hooks": {"few": few.hook, "many": many.hook},
        "n_features": {"few": few.n_features, "many": many.n_features},
        "matching": match.summary(),
        "matching_random_control": control_match.summary(),
        "matched_cosines": match.cosines.tolist(),
        "decomposition": {
            "l1": l1,
            "mean_explained_cosine": float(dec["explained"].mean()),
            "mean_explained_cosine_random_control": float(dec["explained_control"].mean()),
            "control_q95": dec["control_q95"],
            "frac_built_from_few": float(dec["built_from_few"].float().mean()),
            "mean_parents": float(dec["n_parents"].float().mean()),
            "children": {
                str(i): kids
                for i, kids in children_of(
                    dec["coefs"], dec["built_from_few"], top_children
                ).items()
            },
        },
        "_tensors": dec,  # for figures; dropped before writing JSON
        "_control_cosines": control_match.abs_cosines.tolist(),
    }
