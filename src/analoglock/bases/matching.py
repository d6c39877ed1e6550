"""Comparing two sets of feature directions: one-to-one matching and sparse decomposition.

`match_features` pairs features of two bases by |cosine| with an optimal assignment (the sign
of a direction is arbitrary for SVD/PCA/CCA, so -v matches v). `decomposition_matrix` writes
each of many features (e.g. a wide basis) as a sparse combination of a few (e.g. a narrow one),
by ISTA. Plain functions on direction matrices: knows nothing of how the bases were fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor


@dataclass
class Match:
    """pairs[i] = (feature of set 1, feature of set 2); cosines[i] their signed cosine."""

    pairs: Tensor  # [m, 2] long, m = min(n_1, n_2), sorted by the set-1 index
    cosines: Tensor  # [m]

    @property
    def abs_cosines(self) -> Tensor:
        """|cosine| per matched pair."""
        return self.cosines.abs()

    def summary(self, threshold: float = 0.9) -> dict[str, float]:
        """Mean and median |cosine| of the matched pairs, and the fraction above threshold."""
        c = self.abs_cosines
        return {
            "n_pairs": float(len(c)),
            "mean": float(c.mean()),
            "median": float(c.median()),
            f"frac_above_{threshold:g}": float((c > threshold).float().mean()),
        }


def match_features(dirs_1: Annotated[Tensor, "n_1 d"], dirs_2: Annotated[Tensor, "n_2 d"]) -> Match:
    """Optimal one-to-one assignment maximising total |cosine|; min(n_1, n_2) pairs."""
    if dirs_1.ndim != 2 or dirs_2.ndim != 2 or dirs_1.shape[1] != dirs_2.shape[1]:
        raise ValueError(
            f"need [n_1, d] and [n_2, d] direction matrices, got {tuple(dirs_1.shape)} "
            f"and {tuple(dirs_2.shape)}"
        )
    u1 = F.normalize(dirs_1.detach().double(), dim=-1)
    u2 = F.normalize(dirs_2.detach().double(), dim=-1)
    cos = u1 @ u2.T
    rows, cols = linear_sum_assignment(cos.abs().cpu().numpy(), maximize=True)
    rows_t, cols_t = torch.as_tensor(rows), torch.as_tensor(cols)
    return Match(
        pairs=torch.stack([rows_t, cols_t], dim=1).long(),
        cosines=cos[rows_t, cols_t].float(),
    )


def decomposition_matrix(
    few_dirs: Annotated[Tensor, "k d"],
    many_dirs: Annotated[Tensor, "m d"],
    l1: float = 1e-3,
    steps: int = 500,
    nonneg: bool = False,
) -> Annotated[Tensor, "m k"]:
    """C minimising 0.5 ||many - C @ few||^2 + l1 * |C|_1 per row, by ISTA (optionally C >= 0).

    Row j of C says how feature j of the many is built from the few. Directions are used as
    given (normalise them first to compare shapes, not scales). Step 1 / ||few few^T||_2.
    """
    if few_dirs.ndim != 2 or many_dirs.ndim != 2 or few_dirs.shape[1] != many_dirs.shape[1]:
        raise ValueError(
            f"need [k, d] and [m, d] direction matrices, got {tuple(few_dirs.shape)} "
            f"and {tuple(many_dirs.shape)}"
        )
    if l1 < 0 or steps < 1:
        raise ValueError(f"need l1 >= 0 and steps >= 1, got l1={l1}, steps={steps}")
    few, many = few_dirs.detach().double(), many_dirs.detach().double()
    gram = few @ few.T
    lr = 1.0 / torch.linalg.matrix_norm(gram, ord=2).clamp_min(1e-12)
    target = many @ few.T
    c = torch.zeros(len(many), len(few), dtype=torch.float64)
    for _ in range(steps):
        c = c - lr * (c @ gram - target)
        c = torch.sign(c) * (c.abs() - lr * l1).clamp_min(0)  # soft threshold
        if nonneg:
            c = c.clamp_min(0)
    return c.to(many_dirs.dtype)
