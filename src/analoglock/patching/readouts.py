"""Small bases for patching: the standard basis, and next-token logits as downstream features.

`IdentityBasis`: each feature is one coordinate of the hook's space (codes = activations,
directions = the identity). With it, patching every feature at one position is exactly
TransformerLens's whole-position activation patching (the cross-check in the tests).
`TokenLogits`: a downstream "basis" at the last block's resid_post whose codes are the model's
logits for chosen tokens (final norm + unembedding), so an effect on a logit is an effect like
any other. Both quack like `FeatureBasis` where patching needs it (encode, n_features, hook,
directions); only `IdentityBasis` is a saveable FeatureBasis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, ClassVar

import torch
from torch import Tensor, nn

from analoglock.bases.base import FeatureBasis


class IdentityBasis(FeatureBasis):
    """The standard basis of a d_model-dimensional hook: feature i is coordinate i."""

    kind: ClassVar[str] = "identity"

    def __init__(self, n_components: int, hook: str = ""):
        super().__init__(n_components, hook=hook)
        self.d_model = self.n_components

    def fit(self, x: Annotated[Tensor, "n d_model"]) -> IdentityBasis:
        """Nothing to fit; checks the width."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"IdentityBasis({self.d_model}) got rows of width {x.shape[-1]}")
        return self

    def encode(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... n_features"]:
        return x

    def decode(
        self, codes: Annotated[Tensor, "... n_features"]
    ) -> Annotated[Tensor, "... d_model"]:
        return codes

    @property
    def directions(self) -> Annotated[Tensor, "n_features d_model"]:
        return torch.eye(self.n_components)


class TokenLogits(nn.Module):
    """Downstream readout: logits of `token_ids` from the residual at the last block's output."""

    def __init__(self, model, token_ids: Sequence[int]):
        super().__init__()
        if not token_ids:
            raise ValueError("TokenLogits needs at least one token id")
        self.model = model
        self.token_ids = [int(t) for t in token_ids]
        self.hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        self.labels = [model.tokenizer.decode([t]) for t in self.token_ids]

    @property
    def n_features(self) -> int:
        """One code per token."""
        return len(self.token_ids)

    @property
    def directions(self) -> Annotated[Tensor, "n_features d_model"]:
        """Unembedding columns of the tokens (what the logit lens of each reads)."""
        return self.model.W_U[:, self.token_ids].T.detach()

    def encode(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... n_tokens"]:
        """Final norm, unembedding, the chosen columns."""
        return self.model.unembed(self.model.ln_final(x))[..., self.token_ids]
