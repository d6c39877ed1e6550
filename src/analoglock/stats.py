"""Shared statistics with no knowledge of models or features: derangements, row sums, random
directions (isotropic and from the data's covariance), the bootstrap (item resamples, percentile
intervals, the mean), empirical p-values, Benjamini-Hochberg.

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


def derange_within(groups: list[str], generator: torch.Generator | None = None) -> Tensor:
    """A permutation that deranges rows within each group and never moves a row across groups.

    For controls that must match what they control: a story row is re-paired with another story
    row, a role row with another role row (a story-with-role mispairing is trivially wrong and
    would make the control an easy null). Groups with a single row keep it (nothing to swap).
    """
    perm = torch.arange(len(groups))
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for rows in by_group.values():
        if len(rows) < 2:
            continue
        idx = torch.tensor(rows)
        perm[idx] = idx[derange(len(rows), generator)]
    return perm


def bootstrap_indices(n: int, n_boot: int = 2000, seed: int = 0) -> Tensor:
    """[n_boot, n] item indices drawn with replacement: the resamples of every bootstrap here.

    Seeded, so a statistic bootstrapped twice with one seed sees the same resamples (which is
    also what makes two statistics of the same items a paired comparison).
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(int(n), (int(n_boot), int(n)), generator=gen)


def percentile_interval(replicates: Tensor, level: float = 0.95) -> tuple[float, float]:
    """(lo, hi): the central `level` percentile interval of bootstrap replicates.

    NaN replicates (a statistic undefined on that resample) are dropped; all NaN gives NaNs.
    """
    r = replicates.detach().double().flatten()
    r = r[~torch.isnan(r)]
    if len(r) == 0:
        return float("nan"), float("nan")
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(r, q).tolist()
    return float(lo), float(hi)


def bootstrap_mean(
    x: Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of per-item values and its percentile bootstrap interval.

    Items are resampled with replacement (`x` holds one value per item, e.g. a paired difference
    per held-out pair); the generator is seeded, so the interval is reproducible.
    """
    x = x.detach().double().flatten()
    x = x[~torch.isnan(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    lo, hi = percentile_interval(x[bootstrap_indices(len(x), n_boot, seed)].mean(1), level)
    return float(x.mean()), lo, hi


def empirical_p(observed: float | Tensor, null: Tensor, greater: bool = True) -> float | Tensor:
    """One-sided permutation p-value P(null >= observed) with the +1 correction: (1 + k) / (1 + n).

    Never 0; its floor is 1 / (n + 1) (`p_floor`). `greater=False` counts null <= observed. A
    number gives a float; a tensor gives a tensor of its shape, every entry against the same null.
    """
    null = torch.as_tensor(null).detach().double().flatten()
    if not isinstance(observed, Tensor):
        hits = (null >= observed) if greater else (null <= observed)
        return float((1 + hits.sum()) / (1 + len(null)))
    obs = observed.detach().double()
    nb = null.reshape(-1, *([1] * obs.ndim))
    hits = (nb >= obs) if greater else (nb <= obs)
    return (1 + hits.sum(0)).double() / (1 + len(null))


# ---------------------------------------------------------------- random directions (the nulls)

NULL_KINDS = ("isotropic", "covariance")
NULL_WHAT = {
    "isotropic": "uniform on the unit sphere (every direction of d_model equally likely)",
    "covariance": "drawn from N(0, covariance of the activations), i.e. a random direction of the "
    "space the data occupies; the residual stream is anisotropic, so these are the stricter null",
}


def random_unit_directions(
    n: int, d: int, gen: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """n isotropic random unit vectors [n, d] (normalised Gaussians)."""
    v = torch.randn((n, d), generator=gen, dtype=dtype)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(EPS)


def covariance_directions(rows: Tensor, n: int, gen: torch.Generator | None = None) -> Tensor:
    """n random unit vectors [n, d] drawn from N(0, cov(rows)), in float64.

    A Gaussian mixture of the centred rows has exactly their covariance (up to a scale, which the
    normalisation removes), so no d x d matrix is formed.
    """
    xc = rows.detach().double().reshape(-1, rows.shape[-1])
    if len(xc) < 2:
        raise ValueError(f"covariance directions need >= 2 rows, got {len(xc)}")
    xc = xc - xc.mean(0)
    v = torch.randn(n, len(xc), generator=gen, dtype=torch.float64) @ xc
    return v / v.norm(dim=-1, keepdim=True).clamp_min(EPS)


def null_directions(kind: str, n: int, rows: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """n random unit directions [n, d] of one null kind (see NULL_KINDS); `rows` give d and, for
    "covariance", the covariance."""
    if kind == "isotropic":
        return random_unit_directions(n, rows.shape[-1], gen)
    if kind == "covariance":
        return covariance_directions(rows, n, gen)
    raise ValueError(f"Unknown null kind {kind!r}; valid: {', '.join(NULL_KINDS)}")


# ---------------------------------------------------------------- p-values


def p_floor(n: int) -> float:
    """The smallest p-value n null draws can give: 1 / (n + 1)."""
    return 1.0 / (int(n) + 1)


def bh_adjust(p: Tensor) -> Tensor:
    """Benjamini-Hochberg q-values of a flat vector of p-values."""
    n = p.numel()
    order = torch.argsort(p)
    ranked = p[order] * n / torch.arange(1, n + 1, dtype=p.dtype)
    q = torch.flip(torch.cummin(torch.flip(ranked, [0]), 0).values, [0]).clamp(max=1.0)
    out = torch.empty_like(q)
    out[order] = q
    return out
