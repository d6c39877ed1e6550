"""PCA basis: centred SVD, with the mean kept as a feature in its own right when asked.

Plain PCA (mean_as_feature=False) is affine: encode(x) = (x - mean) @ V, decode(c) = mean + c @ V.T
with V the top principal axes; n_features = n_components.

mean_as_feature=True makes the basis linear and gives the mean its own code, so a feature map
can scale or move it like any other feature. The directions are [V.T; mean] (n_components + 1
rows, the mean last) and decode(c) = c[..., :k] @ V.T + c[..., k] * mean. encode is the
orthogonal projection onto span{V, mean} written in those coordinates: the mean's code is
<x, m_perp> / ||m_perp||^2 with m_perp the part of the mean orthogonal to V, and the rest is
(x - code_mean * mean) @ V. On the fitted affine plane (x = mean + c @ V.T) the mean's code is
exactly 1 and the others are plain PCA codes; off it, the reconstruction is never worse than
plain PCA's (it projects onto a larger space). If the mean lies in span(V) (always at full
rank) it has no direction of its own: its code is then fixed at 1 (affine again).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from analoglock.bases.base import FeatureBasis, as_rows

_DEGENERATE = 1e-10  # ||m_perp||^2 / ||mean||^2 below this: the mean is inside span(V)


class PCABasis(FeatureBasis):
    """Top-k principal axes of x [n, d_model]; optionally the mean as an extra, last feature."""

    kind: ClassVar[str] = "pca"
    tensor_names: ClassVar[tuple[str, ...]] = (
        "components",
        "mean",
        "explained_variance",
        "total_variance",
    )

    def __init__(self, n_components: int, mean_as_feature: bool = False, hook: str = ""):
        super().__init__(n_components, hook=hook)
        self.mean_as_feature = bool(mean_as_feature)

    def config(self) -> dict[str, Any]:
        return {"n_components": self.n_components, "mean_as_feature": self.mean_as_feature}

    @property
    def n_features(self) -> int:
        return self.n_components + int(self.mean_as_feature)

    @torch.no_grad()
    def fit(self, x: Annotated[Tensor, "n d_model"]) -> PCABasis:
        """Centre, thin SVD in float64, keep the top n_components axes."""
        x = as_rows(x).double()
        if len(x) < 2:
            raise ValueError("PCA needs at least 2 rows")
        k_max = min(len(x) - 1, x.shape[1])
        if self.n_components > k_max:
            raise ValueError(f"n_components={self.n_components} > min(n - 1, d_model)={k_max}")
        mean = x.mean(dim=0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        var = s.pow(2) / (len(x) - 1)
        k = self.n_components
        self.components = vh[:k].float().contiguous()
        self.mean = mean.float()
        self.explained_variance = var[:k].float()
        self.total_variance = var.sum().float().reshape(())
        self.d_model = x.shape[1]
        return self

    @property
    def explained_variance_ratio(self) -> Tensor:
        """Variance fraction per kept axis; plain PCA's FVU at rank k is 1 - its sum."""
        self.check_fitted()
        return self.explained_variance / self.total_variance

    def _mean_perp(self) -> tuple[Tensor, Tensor]:
        """m_perp = mean minus its projection on span(V), and ||m_perp||^2."""
        m_perp = self.mean - (self.mean @ self.components.T) @ self.components
        return m_perp, m_perp.pow(2).sum()

    def _mean_is_degenerate(self, norm2: Tensor) -> bool:
        return bool(norm2 <= _DEGENERATE * self.mean.pow(2).sum().clamp_min(1e-30))

    def encode(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... n_features"]:
        self.check_fitted()
        x = x.to(self.components.dtype)
        if not self.mean_as_feature:
            return (x - self.mean) @ self.components.T
        m_perp, norm2 = self._mean_perp()
        if self._mean_is_degenerate(norm2):
            a = torch.ones(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)
        else:
            a = (x @ m_perp / norm2).unsqueeze(-1)
        return torch.cat([(x - a * self.mean) @ self.components.T, a], dim=-1)

    def decode(
        self, codes: Annotated[Tensor, "... n_features"]
    ) -> Annotated[Tensor, "... d_model"]:
        self.check_fitted()
        codes = codes.to(self.components.dtype)
        if not self.mean_as_feature:
            return self.mean + codes @ self.components
        return codes[..., :-1] @ self.components + codes[..., -1:] * self.mean

    @property
    def directions(self) -> Annotated[Tensor, "n_features d_model"]:
        """Principal axes, then (with mean_as_feature) the mean as the last row."""
        self.check_fitted()
        if self.mean_as_feature:
            return torch.cat([self.components, self.mean[None]], dim=0)
        return self.components
