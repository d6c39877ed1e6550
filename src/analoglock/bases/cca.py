"""CCA basis: directions shared by two domains (paired rows x_a[i] <-> x_b[i]), ridge-regularised.

`fit_pair(x_a, x_b)` centres both, whitens each with (C_aa + ridge * tr(C_aa)/d * I)^(-1/2) and takes
the SVD of the whitened cross-covariance; its singular values are the canonical correlations.
Per domain there are encoder weights W [d, k] (codes = canonical variates, (x - mean) @ W) and
decoder loadings P [k, d], the least-squares regression of x on the codes, so P is W's
pseudo-inverse in the data metric and decode(encode(.)) is a projection (exact at full rank).
`directions` are domain A's loadings; `directions_b`, `encode(x, domain="b")` and
`for_domain("b")` give domain B's. Ridge is relative to each domain's mean variance, so it is
scale-free. Knows nothing of which domains the rows came from.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from analoglock.bases.base import FeatureBasis, as_rows

DOMAINS = ("a", "b")


def _inv_sqrt(c: Tensor) -> Tensor:
    """Symmetric inverse square root of a positive definite matrix."""
    vals, vecs = torch.linalg.eigh(c)
    return (vecs * vals.clamp_min(1e-12).rsqrt()) @ vecs.T


class CCABasis(FeatureBasis):
    """Top-k canonical directions of a pair of domains; encode/decode domain A unless told "b"."""

    kind: ClassVar[str] = "cca"
    tensor_names: ClassVar[tuple[str, ...]] = (
        "weights_a",
        "weights_b",
        "loadings_a",
        "loadings_b",
        "mean_a",
        "mean_b",
        "correlations",
    )

    def __init__(self, n_components: int, ridge: float = 1e-3, hook: str = ""):
        super().__init__(n_components, hook=hook)
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.ridge = float(ridge)

    def config(self) -> dict[str, Any]:
        return {"n_components": self.n_components, "ridge": self.ridge}

    def fit(self, x: Tensor, x_b: Tensor | None = None) -> CCABasis:
        """CCA needs two domains: fit(x_a, x_b) is fit_pair(x_a, x_b)."""
        if x_b is None:
            raise TypeError("CCABasis needs paired rows of two domains: call fit_pair(x_a, x_b)")
        return self.fit_pair(x, x_b)

    @torch.no_grad()
    def fit_pair(
        self, x_a: Annotated[Tensor, "n d_a"], x_b: Annotated[Tensor, "n d_b"]
    ) -> CCABasis:
        """Ridge CCA on paired rows (row i of x_a is the partner of row i of x_b)."""
        x_a, x_b = as_rows(x_a, "x_a").double(), as_rows(x_b, "x_b").double()
        if len(x_a) != len(x_b):
            raise ValueError(
                f"x_a and x_b must be paired row for row: {len(x_a)} vs {len(x_b)} rows"
            )
        if len(x_a) < 2:
            raise ValueError("CCA needs at least 2 paired rows")
        k_max = min(x_a.shape[1], x_b.shape[1], len(x_a) - 1)
        if self.n_components > k_max:
            raise ValueError(f"n_components={self.n_components} > min(d_a, d_b, n - 1)={k_max}")
        n = len(x_a)
        mean_a, mean_b = x_a.mean(0), x_b.mean(0)
        a, b = x_a - mean_a, x_b - mean_b
        c_aa, c_bb, c_ab = a.T @ a / (n - 1), b.T @ b / (n - 1), a.T @ b / (n - 1)

        def ridged(c: Tensor) -> Tensor:
            lam = self.ridge * torch.trace(c) / len(c)
            return c + lam * torch.eye(len(c), dtype=c.dtype)

        wa_half, wb_half = _inv_sqrt(ridged(c_aa)), _inv_sqrt(ridged(c_bb))
        u, s, vh = torch.linalg.svd(wa_half @ c_ab @ wb_half)
        k = self.n_components
        w_a, w_b = wa_half @ u[:, :k], wb_half @ vh[:k].T

        def loadings(w: Tensor, c: Tensor) -> Tensor:
            # regression of x on codes z = x @ w: (w^T C w)^-1 w^T C, so loadings @ w... = I_k
            return torch.linalg.solve(w.T @ c @ w, w.T @ c)

        self.weights_a, self.weights_b = w_a.float(), w_b.float()
        self.loadings_a, self.loadings_b = loadings(w_a, c_aa).float(), loadings(w_b, c_bb).float()
        self.mean_a, self.mean_b = mean_a.float(), mean_b.float()
        self.correlations = s[:k].float()
        self.d_model = x_a.shape[1]
        return self

    @property
    def canonical_correlations(self) -> Tensor:
        """Correlation of each canonical pair on the fitting data (regularised), descending."""
        self.check_fitted()
        return self.correlations

    def _parts(self, domain: str) -> tuple[Tensor, Tensor, Tensor]:
        if domain not in DOMAINS:
            raise ValueError(f"domain must be 'a' or 'b', got {domain!r}")
        self.check_fitted()
        if domain == "a":
            return self.weights_a, self.loadings_a, self.mean_a
        return self.weights_b, self.loadings_b, self.mean_b

    def encode(
        self, x: Annotated[Tensor, "... d"], domain: str = "a"
    ) -> Annotated[Tensor, "... n_features"]:
        """Canonical variates of x in the given domain."""
        w, _, mean = self._parts(domain)
        return (x.to(w.dtype) - mean) @ w

    def decode(
        self, codes: Annotated[Tensor, "... n_features"], domain: str = "a"
    ) -> Annotated[Tensor, "... d"]:
        """Activations of the given domain from canonical variates."""
        _, p, mean = self._parts(domain)
        return mean + codes.to(p.dtype) @ p

    @property
    def directions(self) -> Annotated[Tensor, "n_features d_a"]:
        """Domain A's decoder loadings."""
        return self._parts("a")[1]

    @property
    def directions_b(self) -> Annotated[Tensor, "n_features d_b"]:
        """Domain B's decoder loadings."""
        return self._parts("b")[1]

    def for_domain(self, domain: str) -> CCADomain:
        """A `FeatureBasisLike` view of one domain, e.g. SparseFeatureMap(cca.for_domain("a"),
        cca.for_domain("b")) maps A to B through the shared canonical codes."""
        self._parts(domain)
        return CCADomain(self, domain)


@torch.no_grad()
def variate_correlations(
    basis: CCABasis, x_a: Annotated[Tensor, "n d_a"], x_b: Annotated[Tensor, "n d_b"]
) -> Annotated[Tensor, "n_features"]:
    """Pearson correlation of each canonical pair on given rows (e.g. held-out pairs), unregularised."""
    if len(x_a) != len(x_b) or len(x_a) < 3:
        raise ValueError(f"need >= 3 paired rows, got {len(x_a)} and {len(x_b)}")
    za, zb = basis.encode(x_a, "a").double(), basis.encode(x_b, "b").double()
    za, zb = za - za.mean(0), zb - zb.mean(0)
    return ((za * zb).sum(0) / (za.norm(dim=0) * zb.norm(dim=0)).clamp_min(1e-12)).float()


class CCADomain:
    """One domain of a fitted CCABasis, with the plain encode(x) / decode(codes) protocol."""

    def __init__(self, basis: CCABasis, domain: str):
        self.basis, self.domain = basis, domain
        self.n_features = basis.n_features

    def encode(self, x: Tensor) -> Tensor:
        return self.basis.encode(x, domain=self.domain)

    def decode(self, codes: Tensor) -> Tensor:
        return self.basis.decode(codes, domain=self.domain)
