"""Key/value caches for decoding, sized once for the whole generation.

transformers' `DynamicCache` concatenates each step's keys and values onto the cache (a copy of
the whole cache per step). `PrefixKVCache` (for `generation.decode`, the HF modules) writes into
buffers sized for prompt + new tokens, so a step copies one position and attention reads views;
its prefill writes chunks of rows from a start column (see `PrefixKVLayer`). `ExpandedKVCache`
(for the bridge, whose attention repeats grouped key/value heads after the cache update) stores
them already repeated to the query heads: same numbers, no per-step copies, `n_heads /
n_kv_heads` times the memory.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class PrefixKVLayer(DynamicLayer):
    """One layer's keys and values in a buffer sized for the whole generation ([batch, n_kv_heads
    * n_rep, capacity, d_head]; `n_rep` > 1 stores each key/value head repeated to its query
    heads, as `repeat_kv` would). `keys`/`values` are views of the filled part, so a step copies
    one position instead of the whole cache (transformers' `DynamicLayer` concatenates).

    `decode` drives it with the compact heads: a prefill chunk writes its `rows` (a slice or an
    index tensor) from position `pad` on, zeroing the positions before it in those rows (padding
    they never attend to; zeros keep the masked scores finite); the loop advances `length` once
    every row has the new positions (`advance`)."""

    def __init__(self, batch: int | None, capacity: int, n_rep: int = 1):
        super().__init__()
        self.batch, self.capacity, self.n_rep = batch, int(capacity), int(n_rep)
        self.length, self.rows, self.pad = 0, slice(None), 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._k = self._buffer(key_states)
        self._v = self._buffer(value_states)
        self.is_initialized = True

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        b, h, _, d = like.shape
        return like.new_empty((self.batch or b, h * self.n_rep, self.capacity, d))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"{type(self).__name__} holds {self.capacity} positions; asked for {end}")  # fmt: skip
        rows = self.rows
        for buf, new in ((self._k, key_states), (self._v, value_states)):
            b, h, t, d = new.shape  # head j of the buffer holds kv head j // n_rep, as repeat_kv
            wide = new.unsqueeze(2).expand(b, h, self.n_rep, t, d)
            if isinstance(rows, slice):
                buf[rows, :, start:end].view(b, h, self.n_rep, t, d).copy_(wide)
            else:
                buf[rows, :, start:end] = wide.reshape(b, h * self.n_rep, t, d)
        if self.pad:
            self._k[rows, :, : self.pad] = 0
            self._v[rows, :, : self.pad] = 0
        self.keys, self.values = self._k[rows, :, :end], self._v[rows, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def advance(self, n: int) -> None:
        self.length += n
        self.rows = slice(None)

    def reset(self) -> None:
        super().reset()
        self.length, self.rows, self.pad = 0, slice(None), 0

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} serves plain greedy/sampled decoding (no beams, cropping or "
            "reordering); use transformers' DynamicCache for those."
        )

    crop = batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported


class PrefixKVCache(DynamicCache):
    """A cache of `PrefixKVLayer`s for `decode`."""

    def __init__(self, n_layers: int, batch: int, capacity: int):
        Cache.__init__(self, layers=[PrefixKVLayer(batch, capacity) for _ in range(n_layers)])

    def write_rows(self, rows: slice | torch.Tensor, pad: int = 0) -> None:
        """The next forward writes these rows' positions from `pad` on (see `PrefixKVLayer`)."""
        for layer in self.layers:
            layer.rows, layer.pad, layer.length = rows, pad, pad

    def prefilled(self, width: int) -> None:
        """Every row holds `width` positions: decoding steps write the whole batch after them."""
        for layer in self.layers:
            layer.rows, layer.pad, layer.length = slice(None), 0, width

    def advance(self, n: int) -> None:
        for layer in self.layers:
            layer.advance(n)


class ExpandedKVLayer(PrefixKVLayer):
    """A `PrefixKVLayer` for transformers' `generate` and the bridge's attention: heads stored
    repeated (`n_rep`), the batch taken from the first keys, `length` advanced by each update, and
    the buffer grown if decoding runs past the planned length."""

    def __init__(self, capacity: int, n_rep: int):
        super().__init__(None, capacity, n_rep)

    def _grow(self, needed: int) -> None:
        """Only when decoding runs past the planned length (not on generate's path)."""
        self.capacity = max(needed, 2 * self.capacity)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], self.capacity, old.shape[-1]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.length + key_states.shape[-2] > self.capacity:
            self._grow(self.length + key_states.shape[-2])
        keys, values = super().update(key_states, value_states)
        self.advance(key_states.shape[-2])
        return keys, values


class ExpandedKVCache(DynamicCache):
    """A dynamic cache whose layers are `ExpandedKVLayer`s (see the module docstring)."""

    def __init__(self, n_layers: int, capacity: int, n_rep: int):
        Cache.__init__(self, layers=[ExpandedKVLayer(capacity, n_rep) for _ in range(n_layers)])
