"""Text generation from the frozen model, with optional hooks active while it generates.

Decoding runs through the wrapped Hugging Face model's own `generate` (KV cache, left padding),
so greedy output equals Hugging Face's; the bridge's hook points still fire because the bridge
wraps those very modules. This sidesteps the bridge's own `generate`, whose KV-cache path
produced garbage on SmolLM2 (see `model._pass_kv_cache_to_bridge_attention`). Hooks see the
prompt once (all positions), then one new position per step.

Chooses the decoding cache too (the caches themselves live in `kv_cache`). The bridge
reimplements attention (so hook_attn_scores and hook_pattern see every head): it appends each
step's keys and values to HF's dynamic cache (a copy of the whole cache per step) and then repeats
the grouped key/value heads to the query heads (another copy, 3x larger for SmolLM2). At batch
128 those copies were ~60% of a decoding step.
`ExpandedKVCache` stores keys and values already repeated to the query heads, in buffers sized for
the whole generation, so a step writes one position and attention reads views: same numbers, no
copies; it costs `n_heads / n_kv_heads` times the cache memory, and is used when that fits.

Samples with `sampling.nucleus_sample` (transformers' distribution, drawn without sorting the
whole vocabulary), run as the last logits processor of a greedy decode (`NucleusSampler`) or
called by `decode` directly.

Decoding with nothing hooked (the corpus) need not go through the bridge at all:
`generate(hook_points=False)` puts the Hugging Face modules the bridge wraps back into the model
for the call (`hf_modules`), so no hook point runs and HF's own attention (SDPA) does, not the
bridge's reimplementation that materialises every score for its hooks. Those modules then run in
`decode`, a plain loop that gives transformers' tokens without `generate`'s per-step machinery
(its cache's per-step concatenation, its processors' full-vocabulary copies), with a prefill that
skips most of the padding (other bits in the attention's sums; the same tokens where measured)
and the linear layers of its steps on MKL's prepacked weights, or transposed copies, wherever
those give `F.linear`'s exact bits.
Models it cannot run (a sliding window) and transformers' own sampling go through `generate` as
before. Hooks on the residual stream between blocks (steering's `hook_resid_post`) need no hook
point either: `hf_hooks` attaches them to the HF decoder layers' inputs and outputs, so steered
decoding runs in `decode` too (greedy at batch 16: 204 against 138 tokens/s through the bridge,
the same tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm
from transformers.generation.logits_process import LogitsProcessor

from analoglock.hooks import resid_boundary
from analoglock.kv_cache import ExpandedKVCache, PrefixKVCache
from analoglock.sampling import (
    NucleusSampler,
    nucleus_sample,
    penalise_repeats_,
    sampling_kwargs,
)
from analoglock.tokens import (
    MEMORY_FRACTION,
    available_memory,
    check_lengths,
    encode_texts,
    pad_ids,
)

log = logging.getLogger(__name__)

Hook = tuple[str, Callable]


def _grouped_attention(model) -> list[torch.nn.Module]:
    """The HF attention modules whose bridge reads `num_key_value_groups` after the cache update
    (TransformerLens's position-embeddings attention: Llama and kin), or [] where another kind
    of attention, or a sliding window, is in the model (then the default cache is used)."""
    try:
        from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (  # noqa: E501
            PositionEmbeddingsAttentionBridge,
        )
    except ImportError:
        return []
    config = model.original_model.config
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return []
    found = [
        m.original_component
        for m in model.modules()
        if isinstance(m, PositionEmbeddingsAttentionBridge)
        and isinstance(getattr(m.original_component, "num_key_value_groups", None), int)
    ]
    return found if len(found) == config.num_hidden_layers else []


@contextmanager
def _expanded_kv_cache(model, rows: int, capacity: int) -> Iterator[dict]:
    """generate() kwargs for an `ExpandedKVCache` ({} when it does not apply or fit), with the
    bridge's attention told, meanwhile, that keys and values come already repeated."""
    attention = _grouped_attention(model)
    if not attention:
        yield {}
        return
    cfg = model.original_model.config
    n_rep = attention[0].num_key_value_groups
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype_bytes = next(model.original_model.parameters()).element_size()
    need = 2 * len(attention) * rows * cfg.num_attention_heads * capacity * d_head * dtype_bytes
    if need > MEMORY_FRACTION * available_memory(model.cfg.device):
        log.info("Expanded KV cache (%.1f GiB) does not fit; using the default", need / 2**30)
        yield {}
        return
    saved = [m.num_key_value_groups for m in attention]
    try:
        for m in attention:
            m.num_key_value_groups = 1
        yield {"cache": ExpandedKVCache(len(attention), capacity, n_rep)}
    finally:
        for m, n in zip(attention, saved, strict=True):
            m.num_key_value_groups = n


def _mkl_linear_ok() -> bool:
    try:  # x86 builds of torch carry MKL's packed GEMM; others (ARM) do not
        return torch.backends.mkl.is_available() and callable(torch.ops.mkl._mkl_linear)
    except (AttributeError, RuntimeError):
        return False


# (rows, in, out, bias?) -> how a decoding step's linear runs here: "packed" (MKL's prepacked
# GEMM) or "transposed" (a matmul with a contiguous transposed weight), the first of them whose
# product equals F.linear's bit for bit on a probe, else "linear" (F.linear itself)
_STEP_KIND: dict[tuple[int, int, int, bool], str] = {}


class _DecodeLinear(torch.nn.Module):
    """A linear layer as `decode` runs it: the same weight (and bias, unless it is all zeros, as
    the bridge leaves it on the output layer), on a contiguous input. A decoding step's
    `rows`-row input goes through MKL's prepacked GEMM (`torch.ops.mkl._mkl_linear`, what
    inductor's freezing uses) where that product equals `F.linear`'s bit for bit on this
    machine, else through a matmul with a contiguous transposed copy of the weight where that
    does, else through `F.linear` itself; other inputs (the prefill's) through `F.linear`.

    Why: at batch 128 the block weights stream from memory every step and MKL re-packs each one
    per call; prepacked, the 576-wide projections ran 10-25% faster (SmolLM2, gate/up 0.83 ->
    0.67 ms, unembedding 25.5 -> 19.2 ms) and a sampled step 206-210 -> 188-193 ms. Bit equality
    is checked once per shape with a random probe (a different summation order shows in some of
    the rows x out sums), so tokens stay transformers' own. SmolLM2's down projection (1536 wide)
    differs packed in the last bits; with the transposed copy it gives F.linear's bits, 8% faster
    (0.61 against 0.66 ms). Only steps: on the prefill's [rows x prompt, d] inputs the packed
    weights ran slower in the model. The copies live in `store` (one per model, kept across
    calls: packing them afresh before each call cost ~0.3 s and slowed the prefill after it by up
    to ~1.5 s, ~0.5 GB of new pages; for SmolLM2 they hold ~0.55 GB while the model lives) and
    are made again when the weight changes in place. Why contiguous: HF slices the prefill's last
    position ([batch, 1, d] with the prompt's stride) and a linear on that view ran as one
    matrix-vector product per row (373 ms at batch 128, against ~20 ms)."""

    def __init__(self, linear: torch.nn.Linear, rows: int, store: dict):
        super().__init__()
        self.weight = linear.weight
        bias = linear.bias
        self.bias = None if bias is None or not bias.any() else bias
        w = self.weight
        self.steps = w.device.type == "cpu" and w.dtype == torch.float32 and _mkl_linear_ok()
        self.rows, self._store = rows, store

    def copy(self, kind: str) -> torch.Tensor:
        """The weight packed by MKL for `rows`-row inputs, or transposed, from the store when
        current (one copy per weight)."""
        w = self.weight
        hit = self._store.get(id(w))
        if hit is None or hit[0] is not w or hit[1:4] != (w._version, self.rows, kind):
            if kind == "packed":
                made = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), self.rows)
            else:
                made = w.detach().t().contiguous()
            self._store[id(w)] = hit = (w, w._version, self.rows, kind, made)
        return hit[4]

    def run(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        if kind == "packed":
            return torch.ops.mkl._mkl_linear(x, self.copy(kind), self.weight, self.bias, self.rows)
        if kind == "transposed":
            t = self.copy(kind)
            return x @ t if self.bias is None else torch.addmm(self.bias, x, t)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def kind(self) -> str:
        """How this shape's steps run (see `_STEP_KIND`), probed on first use."""
        out_f, in_f = self.weight.shape
        key = (self.rows, in_f, out_f, self.bias is not None)
        if key not in _STEP_KIND:  # a private generator: the sampler's draws stay the same
            probe = torch.randn(self.rows, in_f, generator=torch.Generator().manual_seed(0))
            want = torch.nn.functional.linear(probe, self.weight, self.bias)
            kinds = ("packed", "transposed")
            _STEP_KIND[key] = next(
                (k for k in kinds if torch.equal(self.run(k, probe), want)), "linear"
            )
        return _STEP_KIND[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if self.steps and x.numel() // self.weight.shape[1] == self.rows:
            return self.run(self.kind(), x)
        return torch.nn.functional.linear(x, self.weight, self.bias)


@contextmanager
def _decode_linears(hf, rows: int) -> Iterator[int]:
    """Every `torch.nn.Linear` of `hf` (the output layer too) swapped for a `_DecodeLinear`
    for `rows`-row steps; put back on exit, even on error. Yields how many. The weight copies
    (packed or transposed) stay on `hf` (`_decode_weights`) for the next call; entries of weights
    it no longer has go."""
    swaps = [
        (parent, name, child)
        for parent in hf.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear
    ]
    current = {id(child.weight) for _, _, child in swaps}
    store = {k: v for k, v in hf.__dict__.get("_decode_weights", {}).items() if k in current}
    hf.__dict__["_decode_weights"] = store
    try:
        for parent, name, child in swaps:
            setattr(parent, name, _DecodeLinear(child, rows, store))
        yield len(swaps)
    finally:
        for parent, name, child in reversed(swaps):
            setattr(parent, name, child)


@contextmanager
def hf_modules(model) -> Iterator[int]:
    """The model with every module the bridge wraps swapped back for the Hugging Face module it
    wraps (nested ones too: the linear layers inside attention), and with SDPA attention where
    the model supports it; put back on exit, even on error. Yields how many modules it swapped.

    Nothing of TransformerLens runs meanwhile: no hook point fires, whatever is attached to it.
    """
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    hf = model.original_model
    swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def walk(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            inner = getattr(child, "original_component", None)
            if isinstance(child, GeneralizedComponent) and isinstance(inner, torch.nn.Module):
                swaps.append((parent, name, child))
                walk(inner)
            else:
                walk(child)

    walk(hf)
    config = hf.config
    attn = config._attn_implementation
    try:
        for parent, name, child in swaps:
            setattr(parent, name, child.original_component)
        if getattr(hf, "_supports_sdpa", False):
            config._attn_implementation = "sdpa"
        yield len(swaps)
    finally:
        config._attn_implementation = attn
        for parent, name, child in reversed(swaps):
            setattr(parent, name, child)


def hf_hook_sites(model, names: Sequence[str]) -> list[tuple[int, int]] | None:
    """(layer, 0 for the decoder layer's input or 1 for its output) of each hook name, when every
    one is a residual-stream state at a Hugging Face decoder layer's boundary
    (`blocks.L.hook_resid_pre` / `hook_resid_post`, and their aliases `hook_in` / `hook_out`) and
    the model keeps its layers where Llama, Qwen, Gemma and kin do (`model.layers`); else None."""
    hf = model.original_model
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != hf.config.num_hidden_layers:
        return None
    sites = [resid_boundary(name) for name in names]
    if any(at is None or at[0] >= len(layers) for at in sites):
        return None
    return sites


@contextmanager
def hf_hooks(model, fwd_hooks: Sequence[Hook]) -> Iterator[None]:
    """`fwd_hooks` ((name, fn(x, hook)) as `model.hooks` takes them) attached as torch hooks at
    the Hugging Face decoder layers' inputs and outputs, for decoding with `hf_modules` (where no
    hook point runs; enter this first, while the hook points are there to look up); removed on
    exit, even on error. Each fn gets the bridge's own hook point as `hook`, and what it returns
    (unless None) replaces the residual stream, as at the hook point. The names must have
    `hf_hook_sites`. Hooks at one state run in the order given, as TransformerLens runs them."""
    fwd_hooks = list(fwd_hooks)
    names = [name for name, _ in fwd_hooks]
    sites = hf_hook_sites(model, names)
    if sites is None:
        raise ValueError(
            f"hooks {names} are not all at decoder layers' inputs or outputs; without hook points "
            "only blocks.L.hook_resid_pre / hook_resid_post (hook_in / hook_out) can run"
        )
    # the Hugging Face layers, whether or not the bridge's blocks wrap them at the moment
    layers = [getattr(m, "original_component", m) for m in model.original_model.model.layers]
    handles = []

    def call(fn, point, x):  # a hook that returns None leaves the stream as it is
        y = fn(x, hook=point)
        return x if y is None else y

    def before(fn, point):
        def pre(module, args, kwargs):
            if args:
                return (call(fn, point, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": call(fn, point, kwargs["hidden_states"])}

        return pre

    def after(fn, point):
        def post(module, args, out):
            if isinstance(out, tuple):  # families whose layers return (hidden_states, ...)
                return (call(fn, point, out[0]), *out[1:])
            return call(fn, point, out)

        return post

    try:
        for (name, fn), (layer, side) in zip(fwd_hooks, sites, strict=True):
            point = model.hook_dict[name]
            if side == 0:
                h = layers[layer].register_forward_pre_hook(before(fn, point), with_kwargs=True)
            else:
                h = layers[layer].register_forward_hook(after(fn, point))
            handles.append(h)
        yield
    finally:
        for h in handles:
            h.remove()


class _OnStep(LogitsProcessor):
    """Calls `fn` once per decoding step and leaves the scores alone (progress without hooks)."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.fn()
        return scores


def decodable(hf) -> bool:
    """Whether `decode` can run this Hugging Face model: every layer full attention (a sliding
    window needs transformers' own cache) and a linear output layer."""
    types = getattr(hf.config, "layer_types", None) or ()
    linear = isinstance(hf.get_output_embeddings(), torch.nn.Linear)
    return linear and all(t == "full_attention" for t in types)


@torch.no_grad()
def decode(
    hf,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    sample: Callable[[torch.Tensor], torch.Tensor] | None = None,
    repetition_penalty: float = 1.0,
    prefill_rows: int = 16,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """New token ids [batch, <= max_new_tokens] of a left-padded batch, greedy (`sample=None`) or
    drawn by `sample(scores) -> ids` (which may overwrite scores). Rows that ended hold
    `pad_token_id` after their EOS; the loop stops once every row has ended. It does what
    transformers' `generate` does (same greedy choice, same repetition penalty, same sampler and
    draws), without its per-step machinery:

    - keys and values go to a `PrefixKVCache` sized for the generation (no per-step copy);
    - the prompt is prefilled `prefill_rows` rows at a time, the rows taken in order of length,
      and each chunk skips the columns that are padding in all its rows (its queries start at its
      longest row; its keys span the whole width, zeros before that, masked as before). At batch
      128 (story requests of 53-66 tokens, padded to 66) that computes 1.7% more positions than
      the tokens, against 11.9% for the padded batch: the prefill took 5.5-5.9 s against
      6.5-7.6 s. Chunks of 16 rows: 5.46-5.61 s, 32 rows: 5.44-5.88 s, 8 rows: 6.06-6.15 s.
      The numbers change in the last bits, which the tokens need not show: the CPU SDPA kernel
      sums a query's row differently when it sits elsewhere in its block of 32 queries (logits
      differ by up to ~5e-5). At batch 128, 64 new tokens, the greedy tokens stay plain HF's and
      the sampled ones the bridge's. With `prefill_rows` >= the batch, one pass over the whole
      padded batch in its own order (for hooks: `hf_hooks`);
    - every linear layer of a step, the output layer too, runs on MKL's prepacked weights, or a
      transposed copy, where that gives `F.linear`'s exact numbers, on a contiguous input,
      without an all-zero bias (`_DecodeLinear`).

    `hf` must be `decodable`; `on_step` is called once per new token, before it is chosen."""
    if not decodable(hf):
        name = type(hf).__name__
        raise ValueError(f"decode needs full attention and a linear output layer; {name} has not")
    b, width = ids.shape
    cache = PrefixKVCache(hf.config.num_hidden_layers, b, width + max_new_tokens)
    positions = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 0)
    new = ids.new_full((b, max_new_tokens), pad_token_id)
    running = torch.ones(b, dtype=torch.bool, device=ids.device)
    with _decode_linears(hf, b):
        # Rows by length, so that a chunk skips the columns that are padding in all its rows:
        # its queries start there, its keys still span the whole width (masked zeros before it)
        whole = prefill_rows >= b  # one pass over the batch as given (what hooks expect)
        order, scores = torch.argsort(mask.sum(1), stable=True), None
        for r0 in range(0, b, prefill_rows):
            rows = slice(None) if whole else order[r0 : r0 + prefill_rows]
            pad = 0 if whole else int(mask[rows].any(0).int().argmax())  # its first token column
            cache.write_rows(rows, pad)
            out = hf(input_ids=ids[rows, pad:], attention_mask=mask[rows],
                     position_ids=positions[rows, pad:], cache=cache, use_cache=True,
                     logits_to_keep=1)  # fmt: skip
            if scores is None:
                scores = out.logits.new_empty(b, out.logits.shape[-1])
            scores[rows] = out.logits[:, -1]
        cache.prefilled(width)
        scores, seen, position = scores.float(), ids, positions[:, -1:]
        for step in range(max_new_tokens):
            if repetition_penalty != 1.0:
                penalise_repeats_(scores, seen, repetition_penalty)
            if on_step is not None:
                on_step()
            # max's indices are argmax's (the first of equal maxima), in 1.6 ms against 4.3
            token = scores.max(-1).indices if sample is None else sample(scores)
            token = token.masked_fill_(~running, pad_token_id)
            new[:, step] = token
            if eos_token_id is not None:
                running &= token != eos_token_id
            if step == max_new_tokens - 1 or not running.any():
                return new[:, : step + 1]
            seen = torch.cat([seen, token[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
            position = position + 1
            out = hf(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                     cache=cache, use_cache=True)  # fmt: skip
            cache.advance(1)
            scores = out.logits[:, -1].float()
    return new[:, :0]  # max_new_tokens == 0


@dataclass(frozen=True)
class Generation:
    """Prompts, completions and the new token ids of each."""

    prompts: list[str]
    completions: list[str]
    new_tokens: list[list[int]]


def chat_prompt(model, user_message: str) -> str:
    """Wrap a user message in the model's chat template (instruct models answer better)."""
    tok = model.tokenizer
    if not getattr(tok, "chat_template", None):
        return user_message
    return tok.apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
    )


def encode_prompts(model, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, BOS prepended as `model.to_tokens` does (unless the text has it)."""
    return pad_ids(encode_texts(model, prompts), model.tokenizer.pad_token_id, side="left")


@torch.no_grad()
def generate(
    model,
    prompts: str | Sequence[str],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    fwd_hooks: Sequence[Hook] = (),
    batch_size: int = 16,
    progress: bool = False,
    fast_cache: bool = True,
    hf_sampling: bool = False,
    hook_points: bool = True,
    on_step: Callable[[], None] | None = None,
) -> Generation:
    """Greedy or sampled continuations of a batch of prompts, with `fwd_hooks` active throughout.

    Prompts that cannot be generated from (prompt + max_new_tokens past the model's context, or
    a prefill over the memory budget) are refused before any decoding (`tokens.check_lengths`).
    `fast_cache=False` decodes with transformers' default cache instead of `ExpandedKVCache`
    (same tokens; for comparison). Sampling draws with `nucleus_sample`; `hf_sampling=True`
    samples with transformers' own warpers instead (the same distribution, slower, other draws).
    `hook_points=False` decodes with the Hugging Face modules the bridge wraps (`hf_modules`), in
    `decode` where it can run: faster (greedy at batch 16: ~1.5x), and no hook point fires, so
    `fwd_hooks` may only sit at decoder layers' inputs and outputs, where `hf_hooks` attaches them
    (hook_resid_pre / hook_resid_post; the prompt is then prefilled in one pass, as hooks expect;
    the numbers differ from the bridge's in the last bits: SDPA attention). `on_step` is called
    once per decoding step (a progress bar's tick).
    """
    fwd_hooks = list(fwd_hooks)
    names = [name for name, _ in fwd_hooks]
    if not hook_points and names and hf_hook_sites(model, names) is None:
        raise ValueError(
            f"hook_points=False decodes without the bridge's hook points, so hooks can sit only at "
            f"decoder layers' inputs and outputs (blocks.L.hook_resid_pre / hook_resid_post); got "
            f"{names}. Pass hook_points=True (the default) for other hooks."
        )
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    check_lengths(
        model,
        [len(r) for r in encode_texts(model, prompts)],
        [f"prompt {i} ({p[:40]!r})" for i, p in enumerate(prompts)],
        extra=max_new_tokens,
        rows=min(batch_size, len(prompts)) or 1,
        logits=False,  # generate unembeds only the last position
        what="prompt",
        fix="lower max_new_tokens",
    )
    hf = model.original_model
    tok = model.tokenizer
    completions: list[str] = []
    new_tokens: list[list[int]] = []
    sampling = sampling_kwargs(hf, do_sample, temperature, top_p, hf_sampling)
    if on_step is not None:  # before the sampler, which must stay the last processor
        sampling["logits_processor"] = [_OnStep(on_step), *sampling.get("logits_processor", [])]
    modules = nullcontext if hook_points else hf_modules
    # Without hooks the HF modules run in decode's loop, unless transformers samples
    own_loop = not hook_points and not sampling["do_sample"]
    nucleus = [p for p in sampling.get("logits_processor", []) if isinstance(p, NucleusSampler)]
    sample = None
    if nucleus:
        n = nucleus[0]
        sample = partial(nucleus_sample, temperature=n.temperature, top_p=n.top_p, top_k=n.top_k,
                         overwrite=True)  # fmt: skip
    eos = tok.eos_token_id
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generate", disable=not progress):
            ids, mask = encode_prompts(model, prompts[start : start + batch_size])
            device = model.cfg.device
            capacity = ids.shape[1] + max_new_tokens
            # The expanded cache serves the bridge's attention; the HF modules decode with
            # decode's PrefixKVCache (or transformers' cache, where decode cannot run them).
            fast = fast_cache and hook_points
            cache = _expanded_kv_cache(model, len(ids), capacity) if fast else nullcontext({})
            hooked = model.hooks(fwd_hooks=fwd_hooks) if hook_points else hf_hooks(model, fwd_hooks)
            with cache as cache_kwargs, hooked, modules(model):
                if own_loop and decodable(hf):
                    # hooks expect the prompt in one pass, then one position per step
                    whole = {"prefill_rows": len(ids)} if fwd_hooks else {}
                    rows = decode(hf, ids.to(device), mask.to(device), max_new_tokens, eos,
                                  tok.pad_token_id, sample, repetition_penalty,
                                  on_step=on_step, **whole)  # fmt: skip
                    out = torch.cat([ids.to(rows.device), rows], 1)
                else:
                    out = hf.generate(
                        input_ids=ids.to(device),
                        attention_mask=mask.to(device),
                        max_new_tokens=max_new_tokens,
                        pad_token_id=tok.pad_token_id,
                        eos_token_id=eos,
                        repetition_penalty=repetition_penalty,
                        **sampling,
                        **cache_kwargs,
                    )
            for row in out[:, ids.shape[1] :].tolist():
                if eos in row:  # rows that stopped early are padded after their EOS
                    row = row[: row.index(eos)]
                new_tokens.append(row)
                completions.append(tok.decode(row, skip_special_tokens=True))
    return Generation(prompts, completions, new_tokens)
