"""Orthogonal map: M(x) = (x - mu_a) @ R + mu_b with R kept exactly orthogonal while training.

Owns only the rotation family: the hypothesis "B is A, re-centred and rotated" (no stretching).
R is parametrized by torch's `orthogonal` (matrix exponential of a skew matrix times a base), so
any optimizer step leaves it orthogonal. The centres are fixed buffers, set from data.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from analoglock.lock.maps.base import Mapper, check_tensor_keys, detached
from analoglock.lock.maps.baselines import procrustes

ORTHOGONALITY_ATOL = 1e-4  # loose enough for a float32 R that went through safetensors


class OrthogonalMap(Mapper):
    """M(x) = (x - mu_a) R + mu_b; identity at init (R = I, centres 0)."""

    kind = "orthogonal"

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        # The parametrization lives on a child so this class is not swapped for torch's
        # dynamically generated "Parametrized..." subclass (kind, repr and type() stay ours).
        self.rotation = nn.Linear(d_model, d_model, bias=False)
        with torch.no_grad():
            self.rotation.weight.copy_(torch.eye(d_model))
        orthogonal(self.rotation, "weight")
        self.register_buffer("mu_a", torch.zeros(d_model))
        self.register_buffer("mu_b", torch.zeros(d_model))

    @property
    def R(self) -> Annotated[Tensor, "d_model d_model"]:
        """The current orthogonal matrix (recomputed from its parametrization)."""
        return self.rotation.weight

    @classmethod
    def build(
        cls, *, d_model: int, train_a=None, train_b=None, basis=None, **kwargs
    ) -> OrthogonalMap:
        """Start from the closed-form Procrustes solution on the training pairs."""
        if train_a is None or train_b is None or basis is not None:
            raise ValueError("mapper=orthogonal is initialised from training pairs, in raw space.")
        return cls.from_procrustes(train_a, train_b)

    @classmethod
    def from_procrustes(
        cls, x_a: Annotated[Tensor, "n d_model"], x_b: Annotated[Tensor, "n d_model"]
    ) -> OrthogonalMap:
        """Initialise from the closed-form Procrustes solution on paired activations."""
        R, mu_a, mu_b = procrustes(x_a, x_b)
        mapper = cls(x_a.shape[-1]).to(x_a.device)
        mapper.load_tensors({"R": R, "mu_a": mu_a, "mu_b": mu_b})
        return mapper

    def forward(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... d_model"]:
        """(x - mu_a) R + mu_b."""
        return (x - self.mu_a) @ self.R + self.mu_b

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"d_model": self.d_model}

    def export_tensors(self) -> dict[str, Tensor]:
        """The materialised R (not torch's internal parametrization) and the two centres."""
        return detached({"R": self.R, "mu_a": self.mu_a, "mu_b": self.mu_b})

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Set R (must be orthogonal) and the centres in place."""
        check_tensor_keys(type(self).__name__, self.export_tensors(), tensors)
        R = tensors["R"].to(self.mu_a)
        eye = torch.eye(self.d_model, dtype=R.dtype, device=R.device)
        err = (R.T @ R - eye).abs().max().item()
        if err > ORTHOGONALITY_ATOL:
            raise ValueError(
                f"R is not orthogonal: max |R^T R - I| = {err:.2e} > {ORTHOGONALITY_ATOL}."
            )
        with torch.no_grad():
            # Assigning goes through the parametrization's right_inverse: R becomes its base
            # and the learned skew part resets to 0, so the forward reproduces R exactly.
            self.rotation.weight = R
            self.mu_a.copy_(tensors["mu_a"])
            self.mu_b.copy_(tensors["mu_b"])

    def inverse(self, y: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... d_model"]:
        """(y - mu_b) R^T + mu_a."""
        return (y - self.mu_b) @ self.R.T + self.mu_a
