"""Loss terms for learning a map M from domain A's activations to domain B's.

Plain differentiable functions, each returning a scalar tensor, plus `total_loss`, which weighs
named terms so a Hydra config sets each term's weight (0 disables it). Where a function takes
`mapped_a` and `b`, rows are paired by index: row i of `mapped_a` is M(a_i) and its partner is
row i of `b`; both are (n, d). Knows nothing of maps, models, optimizers or training loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from analoglock.stats import EPS


def check_paired(mapped_a: Tensor, b: Tensor) -> None:
    """Raise unless both are (n, d) with the same shape, so row i of each is one pair."""
    if mapped_a.ndim != 2 or mapped_a.shape != b.shape:
        raise ValueError(
            f"expected paired (n, d) rows of equal shape, got {tuple(mapped_a.shape)} and "
            f"{tuple(b.shape)}; flatten positions into rows and pair row i with row i"
        )


def _check_same_n(x: Tensor, y: Tensor, least: int) -> None:
    """Raise unless both are 2-D with the same number of rows, at least `least`."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < least:
        raise ValueError(
            f"expected (n, d1) and (n, d2) with equal n >= {least}, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )


def cosine_matrix(x: Tensor, y: Tensor) -> Tensor:
    """(n, m) cosine similarities between the rows of x (n, d) and of y (m, d)."""
    return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T


def cosine_matching(mapped_a: Tensor, b: Tensor) -> Tensor:
    """1 - mean cosine between M(a_i) and its partner b_i: 0 when every pair points the same way."""
    check_paired(mapped_a, b)
    return 1 - F.cosine_similarity(mapped_a, b, dim=-1).mean()


def info_nce(mapped_a: Tensor, b: Tensor, temperature: float = 0.1) -> Tensor:
    """Symmetric InfoNCE: each row must pick its partner out of the batch, in both directions."""
    check_paired(mapped_a, b)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = cosine_matrix(mapped_a, b) / temperature  # true partners on the diagonal
    target = torch.arange(len(b), device=b.device)
    # A->B asks "which b is mine?", B->A "which M(a) is mine?"; averaging both stops M from
    # winning one direction by collapsing many a's onto one popular b.
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _centred_gram(x: Tensor) -> Tensor:
    """(n, n) Gram matrix of the column-centred rows, i.e. H X X^T H with H the centring matrix."""
    xc = x - x.mean(dim=0, keepdim=True)
    return xc @ xc.T


def linear_cka(X: Tensor, Y: Tensor) -> Tensor:
    """Linear CKA in [0, 1] between X (n, d1) and Y (n, d2): how alike their similarity structures are.

    Compares the centred Gram matrices (n x n, item-by-item similarities), so the feature spaces
    may differ in size and basis: it is invariant to orthogonal transforms and isotropic scaling
    of either side, and to translations. Rows must correspond (row i of X and of Y are the same
    item); for unpaired sets of equal n, order one side first (e.g. by a matching) and read the
    score as a property of that ordering. This is the biased estimator: for independent data it
    is about sqrt(d1 * d2) / n rather than exactly 0, so compare sets with n >> d.
    """
    _check_same_n(X, Y, least=2)
    K, L = _centred_gram(X), _centred_gram(Y)
    hsic_kl = (K * L).sum()  # HSIC up to a 1/(n-1)^2 factor that cancels in the ratio
    return hsic_kl / (K.norm() * L.norm()).clamp_min(EPS)


def cka_loss(X: Tensor, Y: Tensor) -> Tensor:
    """1 - linear CKA: 0 when X and Y have the same similarity structure."""
    return 1 - linear_cka(X, Y)


def rsa_loss(X: Tensor, Y: Tensor) -> Tensor:
    """1 - Pearson correlation between the upper triangles of X's and Y's cosine-similarity matrices."""
    _check_same_n(
        X, Y, least=3
    )  # three items give the fewest off-diagonal pairs (3) worth correlating
    i, j = torch.triu_indices(len(X), len(X), offset=1, device=X.device)
    sx, sy = cosine_matrix(X, X)[i, j], cosine_matrix(Y, Y)[i, j]
    sx, sy = sx - sx.mean(), sy - sy.mean()
    return 1 - (sx * sy).sum() / (sx.norm() * sy.norm()).clamp_min(EPS)


def _sample_pairs(
    n: int, n_pairs: int, generator: torch.Generator | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """n_pairs index pairs (i, j), i != j, uniform over pairs and drawn with replacement."""
    # Draw where the generator lives (a CPU generator cannot fill a CUDA tensor), then move.
    where = generator.device if generator is not None else torch.device("cpu")
    i = torch.randint(n, (n_pairs,), generator=generator, device=where)
    j = torch.randint(n - 1, (n_pairs,), generator=generator, device=where)
    j = j + (j >= i).long()  # skip i itself, so j is uniform over the other n - 1 rows
    return i.to(device), j.to(device)


def relation_preservation(
    mapped_a: Tensor,
    b: Tensor,
    n_pairs: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Scale-free error between the relations M(a_i) - M(a_j) and b_i - b_j, over pairs i < j.

    Returns mean_ij ||(M(a_i) - M(a_j)) - (b_i - b_j)||^2 / mean_ij ||b_i - b_j||^2: 0 when M
    preserves every relation (M(a) = b + c for any constant c), about 1 when M collapses them,
    and about 2 when the relations are scrambled. Over all pairs it is computed exactly in
    O(n d), since sum_{i<j} ||u_i - u_j||^2 = n * sum_i ||u_i - mean u||^2; with `n_pairs`, over
    that many random pairs instead (drawn with `generator`).
    """
    check_paired(mapped_a, b)
    n = len(b)
    if n < 2:
        raise ValueError(f"relations need at least 2 rows, got {n}")
    if n_pairs is None:
        u = mapped_a - b  # relation error of pair (i, j) is u_i - u_j
        err = (u - u.mean(dim=0)).pow(2).sum()
        scale = (b - b.mean(dim=0)).pow(2).sum()
        return err / scale.clamp_min(EPS)
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1 or None (all pairs), got {n_pairs}")
    i, j = _sample_pairs(n, n_pairs, generator, b.device)
    rel_b = b[i] - b[j]
    err = (mapped_a[i] - mapped_a[j] - rel_b).pow(2).sum(dim=-1).mean()
    return err / rel_b.pow(2).sum(dim=-1).mean().clamp_min(EPS)


def cycle_consistency(a: Tensor, roundtrip_a: Tensor) -> Tensor:
    """Normalised MSE of a round trip: sum ||a - a'||^2 / sum ||a - mean a||^2 (0 perfect, 1 = mean)."""
    if a.shape != roundtrip_a.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(roundtrip_a.shape)}")
    a, roundtrip_a = a.reshape(-1, a.shape[-1]), roundtrip_a.reshape(-1, a.shape[-1])
    # Normalised by variance, not by ||a||^2: residual streams carry a large shared mean that
    # would make any round trip look good.
    return (a - roundtrip_a).pow(2).sum() / (a - a.mean(dim=0)).pow(2).sum().clamp_min(EPS)


def l1(t: Tensor) -> Tensor:
    """L1 norm (sum of |entries|; a sum, like nuclear_norm, so weights scale with size)."""
    return t.abs().sum()


def nuclear_norm(t: Tensor) -> Tensor:
    """Sum of singular values of a matrix (summed over any leading batch dims): a low-rank prior."""
    if t.ndim < 2:
        raise ValueError(f"nuclear norm needs a matrix, got shape {tuple(t.shape)}")
    return torch.linalg.svdvals(t).sum()


@dataclass(frozen=True)
class LossTerm:
    """One named loss term and its weight; weight 0 turns it off.

    `fn` is one of this module's functions, or a partial of one (Hydra: `_target_` plus
    `_partial_: true` to fix e.g. `temperature`).
    """

    name: str
    weight: float
    fn: Callable[..., Tensor]

    @property
    def enabled(self) -> bool:
        """Whether the term contributes (weight != 0), so callers can skip computing it."""
        return self.weight != 0


def total_loss(
    terms: Mapping[str, Tensor], weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the enabled terms, and each raw (unweighted) term plus "total" for logging.

    Every computed term needs a weight, and every nonzero weight a computed term, so a typo in a
    config fails loudly instead of silently dropping a loss. Terms with weight 0 need not be
    computed; if they are, they are logged but not added.
    """
    if "total" in terms:
        raise ValueError('"total" is reserved for the weighted sum; rename that term')
    bad = {k: w for k, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"loss weights must be finite and >= 0 (0 disables), got {bad}")
    unweighted = sorted(set(terms) - set(weights))
    if unweighted:
        raise KeyError(
            f"terms {unweighted} have no weight; add them to the loss config (0 disables)"
        )
    missing = sorted(k for k, w in weights.items() if w != 0 and k not in terms)
    if missing:
        raise KeyError(f"weights {missing} are nonzero but those terms were not computed")
    not_scalar = sorted(k for k, t in terms.items() if t.ndim != 0)
    if not_scalar:
        raise ValueError(f"terms {not_scalar} are not scalars; reduce them before weighting")
    enabled = [k for k in terms if weights[k] != 0]
    if not enabled:
        raise ValueError("every computed loss term has weight 0: nothing to train")
    total = torch.stack([weights[k] * terms[k] for k in enabled]).sum()
    logged = {k: t.detach() for k, t in terms.items()}
    logged["total"] = total.detach()
    return total, logged
