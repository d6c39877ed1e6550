"""The forward passes behind the relation operators: states, Jacobians, edited outputs.

Owns running the TransformerBridge on few-shot prompts with the shared part run once (its HF KV
cache reused), reading the subject's last-token state at `blocks.L.hook_resid_post` and the
last-layer state z at the last position, decoding z through the final norm and unembedding, the
Jacobian of z with respect to the subject state (reverse mode through the bridge and its hooks,
`torch.func.vjp` vmapped over cotangents: one backward pass gives every requested layer; forward
mode `torch.func.jvp` for products with chosen directions), and the output after adding an edit
to the subject state. Knows nothing of relations, operators or scores (see lre.py, lre_ops.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from torch import Tensor

from analoglock.relations.derivatives import prefix_cache
from analoglock.relations.lre_data import PromptIds


def layer_hook(layer: int) -> str:
    """Where the subject state is read and edited: the residual stream after block `layer`."""
    return f"blocks.{int(layer)}.hook_resid_post"


def final_hook(model) -> str:
    """The last layer's residual output (z, before the final norm)."""
    return layer_hook(model.cfg.n_layers - 1)


def decode(model, z: Annotated[Tensor, "n d_model"]) -> Annotated[Tensor, "n d_vocab"]:
    """Logits of last-layer states: the model's own final norm, then its unembedding."""
    dev = model.cfg.device
    return model.unembed(model.ln_final(z.to(dev)[:, None, :]))[:, 0].float().cpu()


def _expand(cache, k: int):
    """A fresh copy of a prefix cache for k rows (each forward appends to its cache)."""
    if cache is None:
        return None
    out = copy.deepcopy(cache)
    if k > 1:
        out.batch_repeat_interleave(k)
    return out


def _forward(
    model,
    rows: Annotated[Tensor, "k s"],
    cache,
    adds: dict[str, Tensor],
    read: Sequence[str],
    pos: int | Tensor = 0,
) -> tuple[dict[str, Tensor], Tensor]:
    """Run `rows` after the cached prefix, adding adds[hook] [k, d] at position `pos` (an index or
    one per row), returning ({hook: state at pos before the add} for `read`, z [k, d] last)."""
    k, s = rows.shape
    dev = model.cfg.device
    pos_t = torch.as_tensor(pos).expand(k) if not isinstance(pos, Tensor) else pos
    onehot = torch.nn.functional.one_hot(pos_t.long(), s).to(dev)[:, :, None]  # [k, s, 1]
    seen: dict[str, Tensor] = {}
    final = final_hook(model)

    def make(name: str):
        def hook(x: Tensor, hook=None) -> Tensor:
            if name in read:
                seen[name] = x[torch.arange(k, device=x.device), pos_t.to(x.device)]
            if name in adds:
                x = x + onehot.to(x.dtype) * adds[name].to(x.device, x.dtype)[:, None, :]
            if name == final:
                seen["z"] = x[:, -1]
            return x

        return hook

    names = sorted(set(adds) | set(read) | {final})
    kwargs: dict[str, Any] = {}
    if cache is not None:
        kwargs = {"cache": _expand(cache, k), "use_cache": True}
    with model.hooks(fwd_hooks=[(n, make(n)) for n in names]):
        model(rows.to(dev), return_type=None, **kwargs)
    return {n: seen[n] for n in read}, seen["z"]


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix every row shares."""
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


@torch.no_grad()
def prompt_states(
    model, prompts: Sequence[PromptIds], layers: Sequence[int], chunk: int = 32
) -> tuple[dict[int, Tensor], Tensor]:
    """({layer: subject states [n, d]}, z [n, d]) of each prompt. The tokens every prompt shares
    (the few-shot examples) are run once and cached; the rest runs in batches of equal length."""
    d = model.cfg.d_model
    H = {L: torch.zeros(len(prompts), d) for L in layers}
    Z = torch.zeros(len(prompts), d)
    if not prompts:
        return H, Z
    ids = [p.ids for p in prompts]
    # the cache may hold neither a subject's last token nor a last token
    P = min(_common_prefix(ids), min(p.subject_index for p in prompts))
    cache = prefix_cache(model, torch.tensor(ids[0][:P])) if P > 0 else None
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p.ids), []).append(i)
    hooks = [layer_hook(L) for L in layers]
    for idx in by_len.values():
        for c in range(0, len(idx), chunk):
            part = idx[c : c + chunk]
            rows = torch.tensor([ids[i][P:] for i in part])
            pos = torch.tensor([prompts[i].subject_index - P for i in part])
            got, z = _forward(model, rows, cache, {}, hooks, pos)
            for L, h in zip(layers, hooks, strict=True):
                H[L][part] = got[h].float().cpu()
            Z[part] = z.float().cpu()
    return H, Z


class SubjectFunction:
    """z (last layer, last position) as a function of additions to the subject's last-token
    state at several layers, for one prompt; the tokens before the subject's last token are run
    once and cached."""

    def __init__(self, model, prompt: PromptIds, layers: Sequence[int]):
        self.model, self.layers = model, list(layers)
        ids = torch.tensor(prompt.ids)
        si = prompt.subject_index
        self.cache = prefix_cache(model, ids[:si]) if si > 0 else None
        self.suffix = ids[si:][None]
        self.hooks = [layer_hook(L) for L in self.layers]

    def __call__(self, *deltas: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(z [d], {hook: unperturbed subject state [d]}) with deltas[j] [d] added at layers[j]."""
        adds = {h: dv[None] for h, dv in zip(self.hooks, deltas, strict=True)}
        got, z = _forward(self.model, self.suffix, self.cache, adds, self.hooks, 0)
        return z[0], {h: v[0] for h, v in got.items()}

    def jacobian_rows(
        self, cotangents: Annotated[Tensor, "c d_model"], chunk: int = 64
    ) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
        """(z, {layer: h}, {layer: C J_L [c, d]}): cotangent rows pulled back to every layer at
        once (C = I gives the full Jacobians dz/dh_L, row j = dz_j / dh)."""
        dev = self.model.cfg.device
        zeros = [torch.zeros(self.model.cfg.d_model, device=dev) for _ in self.layers]
        with torch.enable_grad():
            z, vjp_fn, h = torch.func.vjp(self, *zeros, has_aux=True)
            rows = torch.func.vmap(vjp_fn, chunk_size=chunk)(cotangents.to(dev, z.dtype))
        return (
            z.detach().float().cpu(),
            {L: h[k].detach().float().cpu() for L, k in zip(self.layers, self.hooks, strict=True)},
            {L: r.detach().float().cpu() for L, r in zip(self.layers, rows, strict=True)},
        )

    def jvp(self, layer: int, V: Annotated[Tensor, "m d_model"], chunk: int = 64) -> Tensor:
        """J_L v for each row v of V ([m, d]): forward mode through the layers above `layer`."""
        dev = self.model.cfg.device
        j = self.layers.index(layer)
        zeros = [torch.zeros(self.model.cfg.d_model, device=dev) for _ in self.layers]

        def f(delta: Tensor) -> Tensor:
            args = list(zeros)
            args[j] = delta
            return self(*args)[0]

        def one(v: Tensor) -> Tensor:
            return torch.func.jvp(f, (zeros[j],), (v,))[1]

        with torch.no_grad():
            return torch.func.vmap(one, chunk_size=chunk)(V.to(dev)).float().cpu()


@torch.no_grad()
def edited_logits(
    model, prompt: PromptIds, deltas: dict[int, Annotated[Tensor, "k d_model"]], chunk: int = 64
) -> Annotated[Tensor, "k d_vocab"]:
    """Next-token logits of `prompt` with row i's deltas added to the subject's last-token state
    at each layer (rows that edit one layer hold zeros at the others)."""
    ids = torch.tensor(prompt.ids)
    si = prompt.subject_index
    cache = prefix_cache(model, ids[:si]) if si > 0 else None
    k = next(iter(deltas.values())).shape[0]
    out = []
    for c in range(0, k, chunk):
        part = {layer_hook(L): v[c : c + chunk] for L, v in deltas.items()}
        n = next(iter(part.values())).shape[0]
        rows = ids[si:][None].expand(n, -1)
        _, z = _forward(model, rows, cache, part, [], 0)
        out.append(decode(model, z))
    return torch.cat(out)
