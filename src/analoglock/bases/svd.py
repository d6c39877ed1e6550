"""Truncated SVD basis: the top right singular vectors of the *uncentred* activation matrix.

Uncentred on purpose: the mean direction of a residual stream is often its largest "feature",
and SVD keeps it (usually as the first direction). encode = x @ V, decode = c @ V.T, with V the
[d_model, k] top right singular vectors; decode(encode(.)) is the orthogonal projection onto
their span. Knows nothing of centring (see pca.py) or sparsity (see nmf.py).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from torch import Tensor

from analoglock.bases.base import FeatureBasis, as_rows


class SVDBasis(FeatureBasis):
    """Top-k right singular vectors of x [n, d_model] (rows are not centred)."""

    kind: ClassVar[str] = "svd"
    tensor_names: ClassVar[tuple[str, ...]] = ("components", "singular_values", "total_energy")

    @torch.no_grad()
    def fit(self, x: Annotated[Tensor, "n d_model"]) -> SVDBasis:
        """Thin SVD in float64; keeps the top n_components right singular vectors."""
        x = as_rows(x).double()
        k_max = min(x.shape)
        if self.n_components > k_max:
            raise ValueError(f"n_components={self.n_components} > min(n, d_model)={k_max}")
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        k = self.n_components
        self.components = vh[:k].float().contiguous()  # [k, d_model], orthonormal rows
        self.singular_values = s[:k].float()
        self.total_energy = s.pow(2).sum().float().reshape(())  # ||x||_F^2, for the energy ratio
        self.d_model = x.shape[1]
        return self

    def encode(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... n_features"]:
        self.check_fitted()
        return x.to(self.components.dtype) @ self.components.T

    def decode(
        self, codes: Annotated[Tensor, "... n_features"]
    ) -> Annotated[Tensor, "... d_model"]:
        self.check_fitted()
        return codes.to(self.components.dtype) @ self.components

    @property
    def directions(self) -> Annotated[Tensor, "n_features d_model"]:
        self.check_fitted()
        return self.components

    @property
    def explained_energy_ratio(self) -> Tensor:
        """s_i^2 / ||x||_F^2 per direction (uncentred: equals explained variance for centred x)."""
        self.check_fitted()
        return self.singular_values.pow(2) / self.total_energy
