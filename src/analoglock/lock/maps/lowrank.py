"""Low-rank map in residual form: M(x) = x + (x @ V) @ U.T + b_map, rank k.

Owns only the low-rank family: the relation lives in a k-dimensional subspace, which is the
hypothesis "the analogy moves only a few directions". Its nuclear norm is computed on a k x k core.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor, nn

from analoglock.lock.maps.base import Mapper, detached


class LowRankMap(Mapper):
    """M(x) = x + (x V) U^T + b_map with U, V: [d_model, rank]; identity at init (U = 0)."""

    kind = "lowrank"

    def __init__(self, d_model: int, rank: int, init_scale: float = 0.01):
        super().__init__()
        if not 1 <= rank <= d_model:
            raise ValueError(f"rank must be in 1..d_model={d_model}; got {rank}.")
        self.d_model, self.rank, self.init_scale = d_model, rank, init_scale
        # U = 0 makes the map exactly the identity; V random so U gets a gradient at step one.
        self.U = nn.Parameter(torch.zeros(d_model, rank))
        self.V = nn.Parameter(torch.randn(d_model, rank) * init_scale)
        self.b_map = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... d_model"]:
        """x + (x V) U^T + b_map, never forming the d_model x d_model product."""
        return x + (x @ self.V) @ self.U.T + self.b_map

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"d_model": self.d_model, "rank": self.rank, "init_scale": self.init_scale}

    def export_tensors(self) -> dict[str, Tensor]:
        """U, V and b_map."""
        return detached({"U": self.U, "V": self.V, "b_map": self.b_map})

    def regularizers(self) -> dict[str, Tensor]:
        """Penalties: nuclear (sum of singular values of U V^T) and l1 (|U| + |V|)."""
        return {
            "nuclear": nuclear_norm(self.U, self.V),
            "l1": self.U.abs().sum() + self.V.abs().sum(),
        }

    def inverse(self, y: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... d_model"]:
        """Woodbury: x = z - (z V)(I_k + U^T V)^-1 U^T with z = y - b_map; raises if singular."""
        z = (y - self.b_map).reshape(-1, self.d_model)
        core = torch.eye(self.rank, dtype=self.U.dtype, device=self.U.device) + self.U.T @ self.V
        s = torch.linalg.solve(core, z @ self.V, left=False)
        return (z - s @ self.U.T).reshape(y.shape)


def nuclear_norm(
    U: Annotated[Tensor, "d_model k"], V: Annotated[Tensor, "d_model k"]
) -> Annotated[Tensor, ""]:
    """Sum of singular values of U V^T, via the k x k core Q_u^T U V^T Q_v."""
    # U = Q_u R_u and V = Q_v R_v, so U V^T = Q_u (R_u R_v^T) Q_v^T has the core's singular values.
    # Q is taken from detached factors: QR's backward divides by R, which is singular at init
    # (U = 0) and would give NaN. With Q fixed, Q_u^T U = R_u in value and the gradient is exact
    # wherever the norm is differentiable (a minorant touching it at this point).
    Q_u = torch.linalg.qr(U.detach()).Q
    Q_v = torch.linalg.qr(V.detach()).Q
    core = (Q_u.T @ U) @ (V.T @ Q_v)
    return torch.linalg.svdvals(core).sum()
