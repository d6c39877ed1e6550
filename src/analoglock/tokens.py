"""Token-id plumbing shared by harvesting, generation, steering and scoring: BOS and padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def prepend_bos_id(model) -> int | None:
    """The BOS id to put before every text, as `model.to_tokens` does, or None if it prepends none."""
    return model.tokenizer.bos_token_id if model.cfg.default_prepend_bos else None


def pad_ids(
    rows: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id rows into (ids, attention mask); right for scoring/harvesting, left for generation."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
