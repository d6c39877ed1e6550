"""Shared statistics with no knowledge of models or features: derangements, row sums, constants.

A leaf: imports nothing of analoglock, so every layer (bases, lock, patching, relations) can use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-12  # guards divisions by a zero norm or variance; far below any real activation scale


def centred_sum_sq(total: Tensor, sum_sq: Tensor, n: Tensor) -> Tensor:
    """sum_i ||x_i - mean x||^2 from running sums: sum ||x_i||^2 - ||sum x_i||^2 / n."""
    return sum_sq - total.pow(2).sum() / n


def as_rows(x: Tensor) -> Tensor:
    """(..., d) -> (rows, d) in float64, which keeps running sums exact enough to subtract."""
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float64)


def derange(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random derangement of range(n): `b[derange(n)]` re-pairs every row wrongly.

    For the shuffled-pairs control: a map trained on these pairs must not lock. Rejection
    sampling of permutations; about e ~ 2.7 draws on average, for any n.
    """
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    where = generator.device if generator is not None else torch.device("cpu")
    identity = torch.arange(n, device=where)
    while True:
        perm = torch.randperm(n, generator=generator, device=where)
        if not (perm == identity).any():
            return perm
