"""Affine map in residual form: M(x) = x + x @ W_map + b_map.

Owns only the full-rank affine family. Residual form so that zeros mean "no change": the map
starts at the identity and weight decay / L1 pull it back toward the identity, not toward zero.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor, nn

from analoglock.lock.maps.base import Mapper, detached


class AffineMap(Mapper):
    """M(x) = x + x @ W_map + b_map with W_map: [d_model, d_model]; identity at init (zeros)."""

    kind = "affine"

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.W_map = nn.Parameter(torch.zeros(d_model, d_model))
        self.b_map = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... d_model"]:
        """x + x W_map + b_map."""
        return x + x @ self.W_map + self.b_map

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"d_model": self.d_model}

    def export_tensors(self) -> dict[str, Tensor]:
        """W_map and b_map (residual form)."""
        return detached({"W_map": self.W_map, "b_map": self.b_map})

    def regularizers(self) -> dict[str, Tensor]:
        """Penalties: l1 (sparse edits to the identity) and fro (squared distance from the identity)."""
        return {"l1": self.W_map.abs().sum(), "fro": self.W_map.pow(2).sum()}

    def inverse(self, y: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... d_model"]:
        """Solve x (I + W_map) = y - b_map; raises if I + W_map is singular."""
        A = torch.eye(self.d_model, dtype=self.W_map.dtype, device=self.W_map.device) + self.W_map
        rhs = (y - self.b_map).reshape(-1, self.d_model)
        return torch.linalg.solve(A, rhs, left=False).reshape(y.shape)
