"""Translation map: M(x) = x + r, one vector for the whole relation (the CAA / steering-vector form).

Owns only the translation family; it is the one map whose relation vector does not depend on x.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor, nn

from analoglock.lock.maps.base import Mapper, detached


class TranslationMap(Mapper):
    """M(x) = x + r with r: [d_model]; identity at init (r = 0)."""

    kind = "translation"
    changes_relations = False

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.r = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... d_model"]:
        """Shift every activation by r."""
        return x + self.r

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"d_model": self.d_model}

    def export_tensors(self) -> dict[str, Tensor]:
        """The shift r."""
        return detached({"r": self.r})

    def relation_vector(
        self, x_a: Annotated[Tensor, "... d_model"] | None = None
    ) -> Annotated[Tensor, "d_model"]:
        """r itself (x_a is not needed: M(x) - x = r everywhere)."""
        return self.r.clone()  # a copy, so a caller's in-place edit cannot move the map

    def regularizers(self) -> dict[str, Tensor]:
        """Penalties: l1 (a sparse shift) and l2 (squared length: the smallest move that works)."""
        return {"l1": self.r.abs().sum(), "l2": self.r.pow(2).sum()}

    def inverse(self, y: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... d_model"]:
        """y - r."""
        return y - self.r
