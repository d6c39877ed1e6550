"""The model's readout: unembedding with the final norm's gain folded in, for logit-lens style reads.

Beside the model loader; knows nothing of features or reports.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor


def final_norm_gain(model) -> Tensor | None:
    """The final norm's elementwise weight [d_model], or None when the model has none."""
    ln = getattr(model, "ln_final", None)
    if ln is None:
        return None
    for name, p in ln.named_parameters():
        if name.split(".")[-1] == "weight":
            return p.detach().float()
    return None


@torch.no_grad()
def unembedding(model, final_norm: bool = True) -> Annotated[Tensor, "d_model d_vocab"]:
    """The map from a residual direction to logits: W_U, with the final norm's gain folded in."""
    w_u = model.W_U.detach().float()
    if not final_norm:
        return w_u
    gain = final_norm_gain(model)
    return w_u if gain is None else gain[:, None] * w_u
