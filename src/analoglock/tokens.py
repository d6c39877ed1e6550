"""Token-id plumbing shared by harvesting, generation, steering and scoring: BOS, padding, length.

Owns how a text becomes the ids the model reads (BOS first when the model prepends one, as
`model.to_tokens` does), padding rows into a batch, and the one length check every command that
takes text runs before any forward: the model's context (`cfg.n_ctx`) and a memory budget for the
forward's largest transient tensors. Knows nothing of documents, features or hooks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MEMORY_FRACTION = 0.5  # of the memory available now: the estimate below leaves out hook copies
FLOAT_BYTES = 4  # attention scores and logits are float32 even under a bfloat16 model (softmax)


class ContextLengthError(ValueError):
    """A text longer than the model's context or than a forward over it can hold in memory."""


def prepend_bos_id(model) -> int | None:
    """The BOS id to put before every text, as `model.to_tokens` does, or None if it prepends none."""
    return model.tokenizer.bos_token_id if model.cfg.default_prepend_bos else None


def encode_texts(model, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text as the model reads it: BOS first when the model prepends one (unless the
    text already starts with it), no other special tokens."""
    tok = model.tokenizer
    bos = prepend_bos_id(model)
    rows = []
    for ids in tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []:
        ids = list(ids)
        rows.append(ids if bos is None or (ids and ids[0] == bos) else [bos, *ids])
    return rows


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


# --- length: the model's context and a memory budget ---------------------------------------


def _cgroup_free() -> int | None:
    """Bytes left under a cgroup v2 memory limit (containers), or None when there is none."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free now on `device`: CUDA's free memory, or MemAvailable (and a cgroup limit) on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = _cgroup_free()
    return min(free, cgroup) if cgroup is not None else free


def forward_bytes(cfg, length: int, rows: int = 1, logits: bool = True) -> int:
    """Peak transient bytes of one eager forward over rows x length tokens, one layer at a time.

    The attention scores and their softmax ([rows, heads, L, L] twice) dominate long inputs; then
    the MLP's hidden activations, the residual copies, and with `logits` the [rows, L, d_vocab]
    logits and their log-softmax. Weights are not counted: they are already loaded.
    """
    heads = int(cfg.n_heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * cfg.d_model)
    per_token = 4 * int(cfg.d_model) + 3 * d_mlp + (2 * int(cfg.d_vocab) if logits else 0)
    return FLOAT_BYTES * rows * (2 * heads * length * length + length * per_token)


def memory_budget(model, budget_bytes: int | None = None) -> int:
    """The bytes one forward may use: `budget_bytes`, else MEMORY_FRACTION of what is free."""
    if budget_bytes is not None:
        return int(budget_bytes)
    return int(MEMORY_FRACTION * available_memory(model.cfg.device))


def _rows(length: int, rows: int | None, batch_tokens: int | None) -> int:
    """Rows in a batch of texts this long: `rows`, else as many as batch_tokens holds (>= 1)."""
    if rows is not None:
        return max(1, int(rows))
    return max(1, int(batch_tokens) // max(1, length)) if batch_tokens else 1


def max_tokens(
    model,
    extra: int = 0,
    batch_tokens: int | None = None,
    logits: bool = True,
    budget_bytes: int | None = None,
    rows: int | None = None,
) -> int:
    """The longest text (in tokens, before `extra` generated ones) that fits the context and the
    memory budget, in batches of `rows` texts (or batch_tokens // length of them, at least one)."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    hi = (int(n_ctx) if n_ctx else 1 << 20) - extra
    if not all(hasattr(model.cfg, a) for a in ("n_heads", "d_model", "d_vocab")):
        return hi  # a stand-in without a transformer's shape: only its context is known
    budget = memory_budget(model, budget_bytes)
    lo = 0
    while lo < hi:  # the largest L whose forward fits: bytes grow with L
        mid = (lo + hi + 1) // 2
        total = mid + extra
        if forward_bytes(model.cfg, total, _rows(total, rows, batch_tokens), logits) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_lengths(
    model,
    lengths: Sequence[int],
    names: Sequence[str],
    extra: int = 0,
    batch_tokens: int | None = None,
    logits: bool = True,
    budget_bytes: int | None = None,
    rows: int | None = None,
    what: str = "text",
    fix: str = "pass max_length=N to truncate",
) -> int:
    """Refuse, before any forward, texts longer than the model's context or the memory budget.

    `lengths` are token counts (BOS included) of the texts named `names`; `extra` tokens are
    added to each (e.g. max_new_tokens for generation); batches hold `rows` texts, or as many as
    `batch_tokens` tokens allow; `logits=False` when only the last position is unembedded.
    Raises `ContextLengthError` naming the longest offenders, the limit and why, and `fix` (how
    this command truncates when asked). Returns the limit, so a caller asked to truncate can cut
    to it.
    """
    limit = max_tokens(model, extra, batch_tokens, logits, budget_bytes, rows)
    over = sorted(
        ((n, str(name)) for n, name in zip(lengths, names, strict=True) if n > limit),
        reverse=True,
    )
    if over:
        n_ctx = getattr(model.cfg, "n_ctx", None)
        total = over[0][0] + extra
        if n_ctx and total > int(n_ctx):
            why = f"the model's context is {n_ctx} tokens"
        else:
            need = forward_bytes(model.cfg, total, _rows(total, rows, batch_tokens), logits)
            budget = memory_budget(model, budget_bytes)
            of = "" if budget_bytes is not None else f" ({MEMORY_FRACTION:.0%} of free memory)"
            why = (
                f"a forward over {total} tokens needs ~{need / 2**30:.2f} GiB, over the "
                f"{budget / 2**30:.2f} GiB budget{of}"
            )
        plus = f" + {extra} new tokens" if extra else ""
        listing = ", ".join(f"{name} ({n} tokens)" for n, name in over[:5])
        more = f" and {len(over) - 5} more" if len(over) > 5 else ""
        raise ContextLengthError(
            f"{len(over)} {what}(s) are longer than {limit} tokens{plus}: {listing}{more}; "
            f"{why}. Shorten them, or {fix}."
        )
    return limit
