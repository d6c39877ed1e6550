"""Sparse feature map: relate domains feature-to-feature in a feature basis's code space.

x -> decode_b(encode_a(x) @ W_feat + b_feat). W_feat[i, j] says how much of B's feature j is A's
feature i, so its strongest entries are a readable list of analogy edges. Owns only this family;
it knows nothing of how a basis was fit (SAE, PCA, ...): anything `FeatureBasisLike` will do.
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from analoglock.lock.maps.base import Mapper, check_tensor_keys, detached


@runtime_checkable
class FeatureBasisLike(Protocol):
    """Anything with encode(x) -> codes [..., n_features] and decode(codes) -> x."""

    n_features: int

    def encode(self, x: Tensor) -> Tensor:
        """Activations [..., d_model] to codes [..., n_features]."""
        ...

    def decode(self, codes: Tensor) -> Tensor:
        """Codes [..., n_features] to activations [..., d_model]."""
        ...


class SparseFeatureMap(Mapper):
    """M(x) = decode_b(encode_a(x) W_feat + b_feat); W_feat = I at init when the bases match in size.

    basis_b defaults to basis_a (one basis shared by both domains). The bases are held, not
    registered: they are frozen, never exported or checkpointed, and `.to()` does not move them.
    keep_error adds x - decode_a(encode_a(x)) back, so an imperfect basis does not lose what it
    fails to reconstruct (the map is then exactly the identity at W_feat = I with a shared basis).
    """

    kind = "sparse"

    def __init__(
        self,
        basis_a: FeatureBasisLike,
        basis_b: FeatureBasisLike | None = None,
        keep_error: bool = False,
    ):
        super().__init__()
        self.basis_a = basis_a
        self.basis_b = basis_a if basis_b is None else basis_b
        self.keep_error = keep_error
        n_a, n_b = self.basis_a.n_features, self.basis_b.n_features
        # Identity says "feature i of A is feature i of B"; with different sizes there is no prior.
        W = torch.eye(n_a) if n_a == n_b else torch.zeros(n_a, n_b)
        self.W_feat = nn.Parameter(W)
        self.b_feat = nn.Parameter(torch.zeros(n_b))

    @classmethod
    def build(cls, *, d_model: int, train_a=None, train_b=None, basis=None, **kwargs):
        """A feature-to-feature matrix in `basis`'s code space (the basis is required)."""
        if basis is None:
            raise ValueError(
                "mapper=sparse_matrix learns a feature-to-feature matrix and needs basis=<a basis "
                "directory from analoglock-fit-basis, fit at this hook on this model>."
            )
        return cls(basis_a=basis, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        """Keep bases out of the module tree (an SAE is an nn.Module: it must not be trained or saved)."""
        if name in ("basis_a", "basis_b"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def n_a_features(self) -> int:
        """Size of domain A's code space."""
        return self.W_feat.shape[0]

    @property
    def n_b_features(self) -> int:
        """Size of domain B's code space."""
        return self.W_feat.shape[1]

    def forward(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... d_model"]:
        """Encode with A's basis, mix features, decode with B's basis."""
        codes = self.basis_a.encode(x)
        y = self.basis_b.decode(codes @ self.W_feat + self.b_feat)
        if self.keep_error:
            y = y + (x - self.basis_a.decode(codes))
        return y

    def config(self) -> dict[str, Any]:
        """Sizes (checked against the bases on load) and keep_error; the bases are passed separately."""
        return {
            "n_a_features": self.n_a_features,
            "n_b_features": self.n_b_features,
            "keep_error": self.keep_error,
        }

    def export_tensors(self) -> dict[str, Tensor]:
        """W_feat and b_feat only: a basis is not a tensor, so it is saved by its own export."""
        return detached({"W_feat": self.W_feat, "b_feat": self.b_feat})

    @classmethod
    def from_tensors(
        cls,
        cfg: dict[str, Any],
        tensors: dict[str, Tensor],
        basis_a: FeatureBasisLike | None = None,
        basis_b: FeatureBasisLike | None = None,
    ) -> SparseFeatureMap:
        """Rebuild from config + tensors; the bases must be given again and match the sizes."""
        if basis_a is None:
            raise ValueError(
                "SparseFeatureMap.from_tensors needs the feature basis: pass basis_a= (and basis_b= "
                "if domain B used its own), loaded from the basis's own export."
            )
        mapper = cls(basis_a, basis_b, keep_error=cfg.get("keep_error", False))
        got = (mapper.n_a_features, mapper.n_b_features)
        want = (cfg["n_a_features"], cfg["n_b_features"])
        if got != want:
            raise ValueError(
                f"Bases have (n_a, n_b) features {got}; the export was made with {want}."
            )
        check_tensor_keys(cls.__name__, mapper.export_tensors(), tensors)
        mapper.load_tensors(tensors)
        return mapper

    def regularizers(self) -> dict[str, Tensor]:
        """Penalty l1 on W_feat's off-diagonal (all entries when the code spaces differ in size)."""
        W = self.W_feat
        l1 = W.abs().sum()
        if W.shape[0] == W.shape[1]:  # the identity is the prior, not a cost
            # minus the diagonal's share, not |W - diag(W)|: no second n x n matrix per step
            # (an SAE's 4,608 features make W 21M entries)
            l1 = l1 - W.diagonal().abs().sum()
        return {"l1": l1}

    def top_edges(self, k: int, include_diagonal: bool = True) -> list[tuple[int, int, float]]:
        """The k largest-|weight| entries of W_feat as (feature i of A, feature j of B, weight)."""
        W = self.W_feat.detach()
        scores = W.abs().clone()
        n_skipped = 0
        if not include_diagonal and W.shape[0] == W.shape[1]:
            scores.fill_diagonal_(-1.0)  # below any real |weight|, so topk never picks it
            n_skipped = W.shape[0]
        k = min(k, scores.numel() - n_skipped)
        flat = scores.reshape(-1).topk(k).indices
        n_b = W.shape[1]
        return [(int(f) // n_b, int(f) % n_b, float(W.reshape(-1)[f])) for f in flat]
