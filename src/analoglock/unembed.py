"""The model's readout: unembedding with the final norm's gain folded in, for logit-lens style reads.

Beside the model loader; knows nothing of features or reports.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor


def final_norm_gain(model) -> Tensor | None:
    """The final norm's elementwise gain [d_model], or None when the model has none.

    Gemma's RMSNorm multiplies by (1 + w) rather than w (TransformerLens: cfg.rmsnorm_uses_offset),
    so its gain is 1 + weight; reading the raw weight would flip and shrink every logit-lens read.
    """
    ln = getattr(model, "ln_final", None)
    if ln is None:
        return None
    offset = bool(getattr(getattr(model, "cfg", None), "rmsnorm_uses_offset", False))
    for name, p in ln.named_parameters():
        if name.split(".")[-1] == "weight":
            w = p.detach().float()
            return 1 + w if offset else w
    return None


@torch.no_grad()
def unembedding(model, final_norm: bool = True) -> Annotated[Tensor, "d_model d_vocab"]:
    """The map from a residual direction to logits: W_U, with the final norm's gain folded in."""
    w_u = model.W_U.detach().float()
    if not final_norm:
        return w_u
    gain = final_norm_gain(model)
    return w_u if gain is None else gain[:, None] * w_u
