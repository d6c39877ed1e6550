"""The Mapper interface: a learnable map from domain A's residual stream to domain B's.

Owns what every map family shares: forward, its constructor config, its portable tensors, the
relation vector to add for steering, its own regularizers, an inverse where one is exact, and a
flat parameter view. It knows nothing of models, hooks, losses or training loops.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor, nn


class Mapper(nn.Module):
    """Base class: M(x) maps [..., d_in] activations of domain A to [..., d_out] of domain B."""

    kind: ClassVar[str] = ""  # registry key, stored in an export's cfg.json
    # Whether the map can change differences between rows; a translation cannot, so the lock's
    # relation clause does not apply to it (reported as such, never silently passed).
    changes_relations: ClassVar[bool] = True

    def forward(self, x: Annotated[Tensor, "... d_in"]) -> Annotated[Tensor, "... d_out"]:
        """Apply the map to the last axis."""
        raise NotImplementedError

    @classmethod
    def build(
        cls,
        *,
        d_model: int,
        train_a: Tensor | None = None,
        train_b: Tensor | None = None,
        basis=None,
        **kwargs: Any,
    ) -> Mapper:
        """The factory a config names (`_target_: ...AffineMap.build`, `_partial_: true`).

        The trainer fills in the dims, the training pairs (for maps initialised from data) and
        the feature basis (for maps in a code space); other keys are the map's own options.
        """
        if basis is not None:
            raise ValueError(
                f"basis= is used only by mapper=sparse_matrix; a {cls.kind} map works in the raw "
                "activation space (drop basis= or use mapper=sparse_matrix)."
            )
        return cls(d_model=d_model, **kwargs)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: `type(self)(**self.config())` rebuilds it."""
        raise NotImplementedError

    def export_tensors(self) -> dict[str, Tensor]:
        """The tensors that define the map, detached and contiguous, for safetensors."""
        raise NotImplementedError

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy exported tensors into this map in place (keys and shapes must match exactly)."""
        own = self.export_tensors()
        check_tensor_keys(type(self).__name__, own, tensors)
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(self, name).copy_(value)

    @classmethod
    def from_tensors(cls, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> Mapper:
        """Rebuild a map from its `config()` and `export_tensors()`."""
        mapper = cls(**cfg)
        mapper.load_tensors(tensors)
        return mapper

    def relation_vector(
        self, x_a: Annotated[Tensor, "... d_model"] | None = None
    ) -> Annotated[Tensor, "d_model"]:
        """Vector to add to the residual stream to move an A activation toward B: mean M(x_a) - x_a.

        Differentiable; wrap in `torch.no_grad()` when it is only used for steering.
        """
        if x_a is None:
            raise ValueError(
                f"{type(self).__name__} is not a pure translation, so its relation vector depends "
                "on where it is applied: pass x_a, a batch of domain-A activations [..., d_model]."
            )
        y = self(x_a)
        if y.shape != x_a.shape:
            raise ValueError(
                f"relation_vector adds M(x) - x, so it needs d_in == d_out; {type(self).__name__} "
                f"maps {tuple(x_a.shape)} to {tuple(y.shape)}."
            )
        return (y - x_a).reshape(-1, y.shape[-1]).mean(0)

    def regularizers(self) -> dict[str, Tensor]:
        """The map's own sparsity/minimality terms by name (scalars); empty if it has none."""
        return {}

    def inverse(self, y: Annotated[Tensor, "... d_out"]) -> Annotated[Tensor, "... d_in"]:
        """Exact inverse M^-1(y), for cycle consistency; families without one raise."""
        raise NotImplementedError(
            f"{type(self).__name__} ({self.kind!r}) has no exact inverse; cycle-consistency needs "
            "a translation, affine, lowrank or orthogonal map, or a learned reverse map."
        )

    def param_vector(self) -> Annotated[Tensor, "n_params"]:
        """All exported tensors flattened (sorted by name), detached: diff two to see how far it moved."""
        tensors = self.export_tensors()
        return torch.cat([tensors[name].reshape(-1) for name in sorted(tensors)])


def check_tensor_keys(owner: str, expected: dict[str, Tensor], given: dict[str, Tensor]) -> None:
    """Raise if `given` lacks, adds, or reshapes any tensor of `expected`."""
    missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{owner} tensors mismatch: missing {missing}, unexpected {extra}; "
            f"expected exactly {sorted(expected)}."
        )
    for name, value in given.items():
        if value.shape != expected[name].shape:
            raise ValueError(
                f"{owner} tensor {name!r} has shape {tuple(value.shape)}; the config expects "
                f"{tuple(expected[name].shape)}. Was it exported with a different config?"
            )


def detached(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous copies (safetensors refuses shared or strided storage)."""
    return {name: t.detach().clone().contiguous() for name, t in tensors.items()}
