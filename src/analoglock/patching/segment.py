"""Rerun only the stretch of a frozen model between two hooks, from cached clean activations.

Owns: where a hook sits (`Site`: block and stage inside the block) and whether h2 comes after
h1; one clean run per prompt that caches everything the stretch needs (`CleanRun`); and
`Segment.run`, which starts from the clean residual entering the first block that the
intervention can change, adds a batch of interventions (stacked in the batch dimension) at h1,
runs only blocks `start..end`, and returns the activations at h2. Knows nothing of feature
bases: it moves tensors in d_model space; `exact` and `attribution` turn codes into deltas.

Why blocks are called directly: TransformerLens 3.9's `TransformerBridge.forward` raises
NotImplementedError for `start_at_layer` (HF's model.forward owns the layer loop). The clean run
records the keyword arguments HF's decoder loop passed to each block (attention mask, rotary
`position_embeddings`, `position_ids`) with a forward pre-hook, and the rerun calls the bridge's
own `BlockBridge` modules with them. So every TransformerLens hook inside those blocks stays
live (path patching freezes components by hook name), nothing about the architecture's mask or
rotary code is re-implemented, and no layer before h1 or after h2 runs. `Segment.run_full` is the
other way (a hook that adds the delta at h1, the whole prefix recomputed, `stop_at_layer`); the
tests check both give the same numbers and `scripts/bench_patch.py` times them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from torch import Tensor

from analoglock.hooks import block_hook, validate_hook

log = logging.getLogger(__name__)

# Order of hook sites inside one pre-norm block: the residual entering it, the attention side,
# the residual between attention and MLP, the MLP side, the residual leaving it.
RESID_PRE, ATTN_SIDE, ATTN_OUT, RESID_MID, MLP_SIDE, MLP_OUT, RESID_POST = (
    0.0,
    1.0,
    1.5,
    2.0,
    3.0,
    3.5,
    4.0,
)
_NAMED_STAGES = {
    "hook_resid_pre": RESID_PRE,
    "hook_in": RESID_PRE,
    "hook_attn_in": ATTN_SIDE,
    "hook_q_input": ATTN_SIDE,
    "hook_k_input": ATTN_SIDE,
    "hook_v_input": ATTN_SIDE,
    "hook_attn_out": ATTN_OUT,
    "hook_resid_mid": RESID_MID,
    "hook_mlp_in": MLP_SIDE,
    "hook_mlp_out": MLP_OUT,
    "hook_resid_post": RESID_POST,
    "hook_out": RESID_POST,
}
# Where h1 may sit: places whose value is added into (or is) the residual stream. hook_resid_mid
# is excluded on purpose: in the bridge it is ln2's input hook, so writing it changes only what
# the MLP reads, not the residual that flows on.
UPSTREAM_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
_DROP_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # no KV cache reuse


class PatchSetupError(ValueError):
    """Hooks, prompts or bases that cannot be patched as asked."""


@dataclass(frozen=True)
class Site:
    """A hook inside block `layer`; `stage` orders it within the block (None: unknown)."""

    name: str
    layer: int
    stage: float | None

    @property
    def key(self) -> str:
        """The part after `blocks.L.`."""
        return self.name.split(".", 2)[2]


def site_of(name: str) -> Site:
    """Parse `blocks.L.<hook>` into a Site; hooks outside the blocks are refused."""
    where = block_hook(name)
    if where is None:
        raise PatchSetupError(
            f"Hook {name!r} is outside the transformer blocks; patching needs hooks of the form "
            "blocks.L.hook_resid_post (or hook_resid_pre, hook_attn_out, hook_mlp_out, ...)."
        )
    layer, key = where
    stage = _NAMED_STAGES.get(key)
    if stage is None and key.startswith(("attn.", "ln1.")):
        stage = ATTN_SIDE
    elif stage is None and key.startswith(("mlp.", "ln2.")):
        stage = MLP_SIDE
    return Site(name, layer, stage)


def is_after(a: Site, b: Site) -> bool:
    """Whether hook b is computed from hook a (b later in the forward pass, or the same hook)."""
    if a.name == b.name:
        return True
    if b.layer != a.layer:
        return b.layer > a.layer
    if a.stage is None or b.stage is None:
        raise PatchSetupError(
            f"Cannot order {a.name!r} and {b.name!r} inside block {a.layer}; use one of "
            f"{', '.join(_NAMED_STAGES)} or hooks in different blocks."
        )
    return b.stage > a.stage


def read_site(s: Site) -> Site:
    """The residual-stream site that hook s is computed from (itself for residual hooks)."""
    if s.stage in (RESID_PRE, RESID_MID, RESID_POST):
        return Site(s.name, s.layer, s.stage)
    if s.stage in (ATTN_SIDE, ATTN_OUT):
        return Site(f"blocks.{s.layer}.hook_resid_pre", s.layer, RESID_PRE)
    if s.stage in (MLP_SIDE, MLP_OUT):
        return Site(f"blocks.{s.layer}.hook_resid_mid", s.layer, RESID_MID)
    raise PatchSetupError(
        f"Path-specific effects need h2 to be a residual, attention or MLP hook; got {s.name!r}."
    )


@dataclass
class CleanRun:
    """One prompt's clean pass, cut to what `Segment.run` needs (batch dimension dropped)."""

    ids: Annotated[Tensor, "pos"]
    x1: Annotated[Tensor, "pos d_model"]  # clean activation at h1
    x2: Annotated[Tensor, "pos d2"]  # clean activation at h2
    start: Annotated[Tensor, "pos d_model"]  # residual entering block `start` (or x1)
    block_kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)
    frozen: dict[str, Tensor] = field(default_factory=dict)  # clean attn/mlp outputs in range
    x1_source: Tensor | None = None  # the counterfactual prompt's activation at h1
    intervene: Tensor | None = None  # bool [pos]: where interventions apply
    measure: Tensor | None = None  # bool [pos]: where downstream codes are averaged


class _Captured(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the h2 capture hook so no compute runs past h2."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value


def _expand(value: Any, n: int) -> Any:
    """Broadcast batch-1 tensors (and tuples of them) in a block's kwargs to batch n."""
    if isinstance(value, Tensor) and value.ndim >= 2 and value.shape[0] == 1:  # [pos] stays
        return value.expand(n, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_expand(v, n) for v in value)
    return value


def _block_output(out: Any) -> Tensor:
    """The hidden state from a block call (transformers versions return a tensor or a tuple)."""
    return out[0] if isinstance(out, tuple) else out


class Segment:
    """The blocks between an upstream hook h1 and a downstream hook h2 of a frozen model.

    `start` is the first block whose computation an intervention at h1 can change and `end` the
    block holding h2; `blocks` is empty when h2 is the residual h1 itself writes.
    """

    def __init__(self, model, h1: str, h2: str):
        validate_hook(model, h1)
        validate_hook(model, h2)
        self.model = model
        self.h1, self.h2 = site_of(h1), site_of(h2)
        if self.h1.key not in UPSTREAM_HOOKS:
            raise PatchSetupError(
                f"Upstream hook {h1!r} is not a residual-stream write; use blocks.L.<one of "
                f"{', '.join(UPSTREAM_HOOKS)}> (hook_resid_mid only feeds the MLP in the bridge)."
            )
        if not is_after(self.h1, self.h2):
            raise PatchSetupError(
                f"Downstream hook {h2!r} runs before upstream hook {h1!r}: h2 must come at or "
                "after h1 in the forward pass (a later block, or later in the same block)."
            )
        n_layers = model.cfg.n_layers
        post = self.h1.stage == RESID_POST
        self.start = self.h1.layer + 1 if post else self.h1.layer
        self.h1_is_input = self.h1.stage in (RESID_PRE, RESID_POST)
        self.input_hook = h1 if self.h1_is_input else f"blocks.{self.start}.hook_resid_pre"
        self.end = self.h2.layer
        # Names of the residual entering block `start`: h2 there means no block needs to run.
        self.input_names = {self.input_hook}
        if self.h1_is_input:
            self.input_names |= {f"blocks.{self.start}.hook_resid_pre", f"blocks.{self.start}.hook_in"}  # fmt: skip
        self.h2_is_input = h2 in self.input_names
        self.blocks = (
            [] if self.h2_is_input else list(range(self.start, min(self.end, n_layers - 1) + 1))
        )

    # --- components between h1 and h2 ------------------------------------------------------

    def components(self) -> list[str]:
        """Attention and MLP layers whose output lies between h1 and what h2 reads, in order."""
        if self.h2.name == self.h1.name:
            return []
        rs = read_site(self.h2)
        out = []
        for layer in range(self.h1.layer, rs.layer + 1):
            for kind, stage in (("attn", ATTN_OUT), ("mlp", MLP_OUT)):
                after_h1 = (layer, stage) > (self.h1.layer, self.h1.stage)
                before_h2 = (layer, stage) < (rs.layer, rs.stage)
                if after_h1 and before_h2:
                    out.append(f"blocks.{layer}.{kind}")
        return out

    @staticmethod
    def component_hook(component: str) -> str:
        """`blocks.L.attn` -> `blocks.L.hook_attn_out` (the output added to the residual)."""
        layer, kind = component.split(".")[1:3]
        return f"blocks.{layer}.hook_{kind}_out"

    # --- the clean pass ----------------------------------------------------------------------

    def _stop(self, deepest: int) -> int | None:
        """stop_at_layer that still runs block `deepest`."""
        stop = deepest + 1
        return None if stop >= self.model.cfg.n_layers else stop

    @torch.no_grad()
    def activation_at(self, ids: Annotated[Tensor, "pos"], hook: str) -> Tensor:
        """A prompt's clean activation at one block hook, [pos, d]."""
        got: dict[str, Tensor] = {}

        def grab(x: Tensor, hook=None) -> None:
            got["x"] = x[0].detach().clone()

        with self.model.hooks(fwd_hooks=[(hook, grab)]):
            self.model(
                ids[None].to(self.model.cfg.device),
                stop_at_layer=self._stop(site_of(hook).layer),
                return_type=None,
            )
        return got["x"]

    @torch.no_grad()
    def clean(self, ids: Annotated[Tensor, "pos"], source_ids: Tensor | None = None) -> CleanRun:
        """Run one prompt (no padding, batch 1) and keep what the stretch h1 -> h2 needs."""
        model = self.model
        comp_hooks = [self.component_hook(c) for c in self.components()]
        names = list(dict.fromkeys([self.h1.name, self.h2.name, self.input_hook, *comp_hooks]))
        got: dict[str, Tensor] = {}

        def grab(name: str) -> Callable:
            def fn(x: Tensor, hook=None) -> None:
                got[name] = x[0].detach().clone()

            return fn

        kwargs: dict[int, dict[str, Any]] = {}

        def record(layer: int) -> Callable:
            def pre(_module, args, kw):
                kept = {k: v for k, v in kw.items() if k not in _DROP_KWARGS}
                if "use_cache" in kept:
                    kept["use_cache"] = False
                kwargs[layer] = kept

            return pre

        handles = [
            model.blocks[layer].register_forward_pre_hook(record(layer), with_kwargs=True)
            for layer in self.blocks
        ]
        try:
            with model.hooks(fwd_hooks=[(n, grab(n)) for n in names]):
                deepest = max(self.end, self.h1.layer)
                model(ids[None].to(model.cfg.device), stop_at_layer=self._stop(deepest), return_type=None)  # fmt: skip
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in got] + [b for b in self.blocks if b not in kwargs]
        if missing:
            raise RuntimeError(f"Clean run did not reach {missing}")
        src = None if source_ids is None else self.activation_at(source_ids, self.h1.name)
        return CleanRun(
            ids=ids,
            x1=got[self.h1.name],
            x2=got[self.h2.name],
            start=got[self.input_hook],
            block_kwargs=kwargs,
            frozen={n: got[n] for n in comp_hooks},
            x1_source=src,
        )

    # --- the stretch -------------------------------------------------------------------------

    def _hooks(
        self, clean: CleanRun, delta: Tensor, freeze: Sequence[str], cut_direct: bool
    ) -> list[tuple[str, Callable]]:
        """Forward hooks (in firing order) for one rerun; the h2 capture is added by the caller."""
        hooks: list[tuple[str, Callable]] = []
        if not self.h1_is_input:
            hooks.append((self.h1.name, lambda x, hook=None: x + delta))
        for component in freeze:
            name = self.component_hook(component)
            value = clean.frozen[name]
            hooks.append((name, lambda x, hook=None, v=value: v.expand_as(x)))
        if cut_direct and not self._reads_input():
            hooks.append((read_site(self.h2).name, lambda x, hook=None: x - delta))
        return hooks

    def _reads_input(self) -> bool:
        """Whether h2 is computed straight from the residual that h1 writes (no block between)."""
        return self.h1_is_input and read_site(self.h2).name in self.input_names

    def _routes(self, routes) -> tuple[list[str], bool]:
        """(components to freeze, whether to cut the direct residual path) for a Routes or None."""
        if routes is None:
            return [], False
        return [c for c in self.components() if c not in routes.components], not routes.direct

    def run(
        self,
        clean: CleanRun,
        delta: Annotated[Tensor, "n pos d_model"],
        routes=None,
    ) -> Annotated[Tensor, "n pos d2"]:
        """Activations at h2 for each of n interventions `delta` added at h1 (only start..end run).

        `routes` (a `paths.Routes`) restricts the effect to some routes; None lets it flow everywhere.
        Differentiable in `delta` when grad is enabled.
        """
        freeze, cut_direct = self._routes(routes)
        n = delta.shape[0]
        x = clean.start.to(delta.dtype).expand(n, *clean.start.shape)
        if self.h1_is_input and not (cut_direct and self._reads_input()):
            x = x + delta
        if self.h2_is_input:
            return x
        hooks = self._hooks(clean, delta, freeze, cut_direct)

        def capture(x2: Tensor, hook=None) -> None:
            raise _Captured(x2)

        hooks.append((self.h2.name, capture))
        try:
            with self.model.hooks(fwd_hooks=hooks):
                for layer in self.blocks:
                    kw = {k: _expand(v, n) for k, v in clean.block_kwargs[layer].items()}
                    x = _block_output(self.model.blocks[layer](x, **kw))
        except _Captured as got:
            return got.value
        raise RuntimeError(f"{self.h2.name} did not fire in blocks {self.blocks}")

    def run_full(
        self,
        ids: Annotated[Tensor, "pos"],
        delta: Annotated[Tensor, "n pos d_model"],
        clean: CleanRun | None = None,
        routes=None,
    ) -> Annotated[Tensor, "n pos d2"]:
        """Reference: the whole prefix recomputed, delta added by a hook at h1, stop after h2."""
        freeze, cut_direct = self._routes(routes)
        if freeze and clean is None:
            raise ValueError("run_full with frozen components needs the prompt's CleanRun")
        n = delta.shape[0]
        hooks = [(self.h1.name, lambda x, hook=None: x + delta)]
        for component in freeze:
            name = self.component_hook(component)
            hooks.append((name, lambda x, hook=None, v=clean.frozen[name]: v.expand_as(x)))
        if cut_direct:
            hooks.append((read_site(self.h2).name, lambda x, hook=None: x - delta))
        got: dict[str, Tensor] = {}

        def capture(x2: Tensor, hook=None) -> None:
            got["x2"] = x2.clone()

        hooks.append((self.h2.name, capture))
        with self.model.hooks(fwd_hooks=hooks):
            self.model(
                ids[None].expand(n, -1).to(self.model.cfg.device),
                stop_at_layer=self._stop(max(self.end, self.h1.layer)),
                return_type=None,
            )
        return got["x2"]
