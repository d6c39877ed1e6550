"""What an intervention on an upstream feature does: the change it makes to that feature's code.

Every intervention here edits one feature's code a_i at chosen positions and writes the change
back along the feature's decoder direction d_i (for a non-linear encoder such as an SAE, a_i d_i is
the feature's decoder contribution, so the edit does not re-encode anything):

    delta_i[t] = c_i[t] * d_i,   c = `coefficients(a, a_source)`  [pos, n_features]

- `Ablate(alpha)`: c = -alpha * a (alpha = 1 is full ablation, alpha in (0, 1) partial ablation);
- `MeanAblate(means)`: c = mean - a (the code replaced by its mean over the prompt set's
  intervention positions, or by given means);
- `Patch()`: c = a_source - a (counterfactual patching: the code set to its value on the paired
  prompt at the same position).

The random-direction control uses the same c along a direction of equal norm (`random_directions`).
Knows nothing of models or where deltas are added; `exact` and `attribution` do that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

import torch
from torch import Tensor

from analoglock.stats import random_unit_directions

MODES = ("ablate", "partial", "mean", "patch")


class InterventionError(ValueError):
    """An intervention that cannot be built or applied as asked."""


@dataclass(frozen=True)
class Ablate:
    """Subtract alpha * a_i d_i: full ablation at alpha = 1, partial ablation below."""

    alpha: float = 1.0
    name: str = "ablate"

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise InterventionError(
                f"alpha must be in [0, 1] (1 = full ablation, 0.1 = 10% partial), got {self.alpha}"
            )

    def coefficients(self, a: Tensor, a_source: Tensor | None = None) -> Tensor:
        """c = -alpha * a."""
        return -float(self.alpha) * a


@dataclass(frozen=True, eq=False)
class MeanAblate:
    """Replace a_i by its mean: add (mean_i - a_i) d_i. `means` None: fill with `with_means`."""

    means: Tensor | None = None
    name: str = "mean"

    def coefficients(self, a: Tensor, a_source: Tensor | None = None) -> Tensor:
        """c = mean - a."""
        if self.means is None:
            raise InterventionError("MeanAblate has no means: call with_means(codes) first")
        return self.means.to(a) - a

    def with_means(self, codes: Sequence[Tensor]) -> MeanAblate:
        """A copy holding the mean code over the given rows ([pos, n] tensors, pooled)."""
        rows = torch.cat([c.reshape(-1, c.shape[-1]) for c in codes])
        if len(rows) == 0:
            raise InterventionError("No positions to take feature means over")
        return MeanAblate(rows.mean(dim=0), self.name)


@dataclass(frozen=True)
class Patch:
    """Counterfactual patching: set a_i to its value on the paired (source) prompt."""

    name: str = "patch"

    def coefficients(self, a: Tensor, a_source: Tensor | None = None) -> Tensor:
        """c = a_source - a."""
        if a_source is None:
            raise InterventionError(
                "Patch needs a source prompt per prompt (clean <-> corrupted pairs of equal token "
                "length); build the prompts with sources=..."
            )
        if a_source.shape != a.shape:
            raise InterventionError(
                f"Patch source codes {tuple(a_source.shape)} do not match {tuple(a.shape)}"
            )
        return a_source - a


Intervention = Ablate | MeanAblate | Patch


def make_intervention(mode: str, alpha: float = 1.0, means: Tensor | None = None) -> Intervention:
    """`ablate` (alpha = 1), `partial` (alpha in [0, 1]), `mean` or `patch`, by name."""
    if mode == "ablate":
        return Ablate(1.0)
    if mode == "partial":
        return Ablate(float(alpha), name="partial")
    if mode == "mean":
        return MeanAblate(means)
    if mode == "patch":
        return Patch()
    raise InterventionError(f"Unknown mode {mode!r}; valid modes: {', '.join(MODES)}")


@dataclass(frozen=True)
class Deltas:
    """Builds d_model deltas from coefficients and directions, one feature per batch row."""

    directions: Annotated[Tensor, "n_features d_model"]
    controls: Annotated[Tensor, "n_features d_model"] | None = field(default=None)

    def features(
        self, c: Annotated[Tensor, "pos n_features"], ids: Tensor, control: bool = False
    ) -> Annotated[Tensor, "k pos d_model"]:
        """delta[k, t] = c[t, ids[k]] * direction[ids[k]] (or the control direction)."""
        dirs = self.controls if control else self.directions
        if dirs is None:
            raise InterventionError("No control directions were built")
        return c[:, ids].T.unsqueeze(-1) * dirs[ids].unsqueeze(1)


def random_directions(
    directions: Annotated[Tensor, "n d_model"], seed: int = 0
) -> Annotated[Tensor, "n d_model"]:
    """Isotropic random directions (seeded), each with the norm of the matching row."""
    gen = torch.Generator().manual_seed(int(seed))
    r = random_unit_directions(len(directions), directions.shape[-1], gen)
    r = r * directions.detach().double().cpu().norm(dim=-1, keepdim=True)
    return r.to(dtype=directions.dtype, device=directions.device)
