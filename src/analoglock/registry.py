"""Name -> class registries (mappers, bases): one lookup with an error that lists what is valid."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(table: Mapping[str, T], kind: str, what: str) -> T:
    """table[kind], or a ValueError naming the closest valid kind and listing them all."""
    if kind in table:
        return table[kind]
    close = difflib.get_close_matches(str(kind), list(table), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown {what} kind {kind!r}.{hint} Valid kinds: {', '.join(table)}.")
