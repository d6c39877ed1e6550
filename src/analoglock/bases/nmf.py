"""NMF basis: non-negative parts of activations, with non-negative codes.

What is made non-negative: activations have both signs, so each row x is lifted to
[relu(x), relu(-x)] (2 * d_model, nothing thrown away: x = relu(x) - relu(-x)), and NMF
factorises the lifted matrix as W @ H with W >= 0 (codes) and H >= 0 (the dictionary,
[n_features, 2 * d_model]), by multiplicative updates (Lee & Seung), deterministic for a seed.
The decoder direction of feature i back in activation space is H[i, :d] - H[i, d:].

Encoding is done in activation space, where reconstruction is judged: codes are the
non-negative least squares solution of x ~ c @ directions, c >= 0, by projected gradient steps
from the clamped least-squares solution (exact at once for x in the cone of the directions).
Knows nothing of SAEs; fitting on SAE codes (already non-negative) would be another basis.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from analoglock.bases.base import FeatureBasis, as_rows

_EPS = 1e-12  # keeps multiplicative updates away from 0 / 0


def lift(x: Tensor) -> Tensor:
    """[..., d] -> [..., 2d] = [relu(x), relu(-x)], a non-negative view that loses nothing."""
    return torch.cat([x.clamp_min(0), (-x).clamp_min(0)], dim=-1)


def nmf_multiplicative(
    v: Annotated[Tensor, "n m"], k: int, n_iter: int = 300, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """V ~ W @ H with W [n, k] >= 0, H [k, m] >= 0, Frobenius loss, Lee-Seung updates."""
    if (v < 0).any():
        raise ValueError("NMF input must be non-negative")
    g = torch.Generator().manual_seed(seed)
    scale = (v.mean() / k).clamp_min(_EPS).sqrt()  # so W @ H starts at the data's scale
    w = torch.rand(v.shape[0], k, generator=g, dtype=v.dtype) * scale
    h = torch.rand(k, v.shape[1], generator=g, dtype=v.dtype) * scale
    for _ in range(n_iter):
        h = h * (w.T @ v) / (w.T @ w @ h + _EPS)
        w = w * (v @ h.T) / (w @ (h @ h.T) + _EPS)
    return w, h


class NMFBasis(FeatureBasis):
    """Non-negative dictionary on [relu(x), relu(-x)]; non-negative codes by NNLS."""

    kind: ClassVar[str] = "nmf"
    tensor_names: ClassVar[tuple[str, ...]] = ("dictionary",)

    def __init__(
        self,
        n_components: int,
        n_iter: int = 300,
        encode_steps: int = 100,
        seed: int = 0,
        hook: str = "",
    ):
        super().__init__(n_components, hook=hook)
        self.n_iter = int(n_iter)
        self.encode_steps = int(encode_steps)
        self.seed = int(seed)

    def config(self) -> dict[str, Any]:
        return {
            "n_components": self.n_components,
            "n_iter": self.n_iter,
            "encode_steps": self.encode_steps,
            "seed": self.seed,
        }

    @torch.no_grad()
    def fit(self, x: Annotated[Tensor, "n d_model"]) -> NMFBasis:
        """Multiplicative-update NMF of lift(x); dictionary rows scaled to unit norm."""
        x = as_rows(x).double()
        _, h = nmf_multiplicative(lift(x), self.n_components, self.n_iter, self.seed)
        h = h / h.norm(dim=1, keepdim=True).clamp_min(_EPS)  # W absorbs the scale
        self.dictionary = h.float()
        self.d_model = x.shape[1]
        return self

    @property
    def directions(self) -> Annotated[Tensor, "n_features d_model"]:
        """Signed decoder directions H[:, :d] - H[:, d:]."""
        self.check_fitted()
        d = self.dictionary.shape[1] // 2
        return self.dictionary[:, :d] - self.dictionary[:, d:]

    @torch.no_grad()
    def encode(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... n_features"]:
        """argmin_{c >= 0} ||x - c @ directions||^2 by projected gradient (encode_steps steps)."""
        self.check_fitted()
        dirs = self.directions.double()
        shape = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1]).double()
        gram = dirs @ dirs.T
        lr = 1.0 / torch.linalg.matrix_norm(gram, ord=2).clamp_min(_EPS)  # 1 / Lipschitz
        c = (rows @ torch.linalg.pinv(dirs)).clamp_min(0)  # warm start: clamped least squares
        xd = rows @ dirs.T
        for _ in range(self.encode_steps):
            c = (c - lr * (c @ gram - xd)).clamp_min(0)
        return c.to(x.dtype if x.is_floating_point() else torch.float32).reshape(*shape, -1)

    def decode(
        self, codes: Annotated[Tensor, "... n_features"]
    ) -> Annotated[Tensor, "... d_model"]:
        self.check_fitted()
        return codes.to(self.dictionary.dtype) @ self.directions
