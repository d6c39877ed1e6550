"""Command-line values as plain Python: the one place a Hydra list-or-scalar becomes a list."""

from __future__ import annotations

from typing import Any

from omegaconf import ListConfig, OmegaConf


def as_list(value: Any, *, none: str = "empty") -> list | None:
    """A Hydra list (ListConfig), list, tuple or scalar as a plain Python list.

    `none` says what null means for this option: "empty" ([], e.g. "no layers given") or "keep"
    (None, e.g. "not given: use every feature"). There is no default reading of null elsewhere.
    """
    if none not in ("empty", "keep"):
        raise ValueError(f"none must be 'empty' or 'keep', not {none!r}")
    if value is None:
        return [] if none == "empty" else None
    if isinstance(value, ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]
