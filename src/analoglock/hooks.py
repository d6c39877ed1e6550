"""Hook names: validation with actionable errors, layer bookkeeping, and temporary hooks.

Owns the rules for TransformerLens hook strings (`blocks.6.hook_resid_post`). Hooks are global
state on the model, so the package only attaches them inside `model.hooks(...)` context managers.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")  # the one parser of "blocks.<layer>.<rest>"
_EMBED_STATES = ("hook_embed", "embed.hook_out")  # the residual stream before block 0
# residual-stream hooks inside a block -> their offset along the stream from the block's input
# (the bridge's hook_in / hook_out are aliases of hook_resid_pre / hook_resid_post)
_RESID_OFFSET = {"hook_resid_pre": 0, "hook_in": 0, "hook_resid_post": 1, "hook_out": 1}
_EMBED_HOOKS = ("hook_embed", "embed.", "hook_pos_embed", "hook_tokens", "rotary_emb.")


class HookNameError(ValueError):
    """A hook name the model does not have."""


class LayerOutOfRangeError(HookNameError):
    """A hook name whose layer index is past the model's last layer."""


def block_hook(name: str) -> tuple[int, str] | None:
    """(layer, rest) of a hook inside a block (`blocks.6.hook_resid_post` -> (6, "hook_resid_post")),
    or None for hooks outside the blocks."""
    m = _BLOCK_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def hook_layer(name: str) -> int | None:
    """Block index of a hook name, or None for hooks outside the blocks."""
    where = block_hook(name)
    return where[0] if where else None


def residual_depth(name: str) -> int | None:
    """Position of a complete residual-stream state along the stream: the embedding and
    `blocks.0.hook_resid_pre` are 0, `blocks.l.hook_resid_post` = `blocks.l+1.hook_resid_pre` = l+1;
    None for any other hook (attention, MLP, resid_mid, ln_final, ...)."""
    if name in _EMBED_STATES:
        return 0
    at = resid_boundary(name)
    return None if at is None else at[0] + at[1]


def resid_boundary(name: str) -> tuple[int, int] | None:
    """(l, 0) for the residual stream entering block l (`blocks.l.hook_resid_pre`, `hook_in`),
    (l, 1) for it leaving (`hook_resid_post`, `hook_out`); None for any other hook."""
    where = block_hook(name)
    if where is None or where[1] not in _RESID_OFFSET:
        return None
    return where[0], _RESID_OFFSET[where[1]]


def resid_post_after(name: str, offset: int, n_layers: int) -> str:
    """The `hook_resid_post` `offset` blocks after `name`'s block, capped at the last block."""
    layer = hook_layer(name)
    if layer is None:
        raise HookNameError(f"Hook {name!r} is not inside a block; give the later hook explicitly")
    return f"blocks.{min(layer + max(int(offset), 0), n_layers - 1)}.hook_resid_post"


def valid_hook_names(model) -> list[str]:
    """Every hook name the model exposes."""
    return sorted(model.hook_dict.keys())


def validate_hook(model, name: str) -> str:
    """Return `name` if the model has it, else raise an error listing what is valid."""
    names = model.hook_dict
    if name in names:
        return name
    n_layers = model.cfg.n_layers
    layer = hook_layer(name)
    if layer is not None and layer >= n_layers:
        raise LayerOutOfRangeError(
            f"Hook {name!r}: layer {layer} is out of range; the model has {n_layers} layers "
            f"(valid layers 0..{n_layers - 1})."
        )
    if layer is not None:
        prefix = f"blocks.{layer}."
        candidates = sorted(n for n in names if n.startswith(prefix))
        where = f"layer {layer}"
    else:
        candidates = sorted(n for n in names if not n.startswith("blocks."))
        where = "outside the blocks"
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise HookNameError(
        f"Unknown hook name {name!r}.{hint} Valid names {where}: {', '.join(candidates)}"
    )


def validate_hooks(model, names: Iterable[str]) -> list[str]:
    """Validate several hook names, keeping their order and dropping repeats."""
    out: list[str] = []
    for name in names:
        if validate_hook(model, name) not in out:
            out.append(name)
    if not out:
        raise HookNameError("No hook names given; e.g. blocks.15.hook_resid_post.")
    return out


def stop_layer(names: Iterable[str], n_layers: int) -> int | None:
    """The `stop_at_layer` that still runs every block the hooks need (None: run everything)."""
    deepest = -1
    for name in names:
        layer = hook_layer(name)
        if layer is None:
            if not name.startswith(_EMBED_HOOKS):
                return None  # ln_final / unembed need the whole model
            continue
        deepest = max(deepest, layer)
    stop = deepest + 1
    return None if stop >= n_layers else max(stop, 1)
