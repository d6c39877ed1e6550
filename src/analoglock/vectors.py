"""Steering vectors that travel: llama.cpp control vectors (GGUF) and analoglock's safetensors.

Owns the `ControlVector` (one [d_model] direction per llama.cpp layer index, plus where it came
from), the mapping between TransformerLens hook names and llama.cpp's layer indices, writing and
reading both file formats, and applying a control vector the way llama.cpp does. Knows nothing of
locks, datasets or how a vector was measured: callers pass the provenance in.

What llama.cpp adds where (read from its source, ggml-org/llama.cpp):
- `common/common.cpp`, `common_control_vector_load_one`: every tensor must be named
  `direction.N` with an integer N >= 1 (`direction.0` or an unparsable name rejects the whole
  file), type F32, 1-D, all of one length n_embd. Each is multiplied by the file's strength
  (`--control-vector FILE`: 1.0; `--control-vector-scaled FILE S`: S) and ADDED into a flat
  buffer at offset n_embd * (N - 1); several files, or repeated N, sum. No metadata key is read.
- `src/llama-adapter.cpp`, `llama_adapter_cvec::apply`: block il (0-based, il = 1..n_layer-1)
  takes its tensor from offset n_embd * (il - 1). The two "- 1"s cancel: `direction.N` belongs to
  block N. Block 0 never gets one; N >= n_layer is silently dropped; an n_embd other than the
  model's fails the load.
- `llama_adapter_cvec::apply_to`, called as `build_cvec(cur, il)` at the end of each block in
  the model graphs (e.g. `src/models/gemma3.cpp`, after the FFN residual add, named `l_out`):
  `cur = cur + tensors[il]` when `--control-vector-layer-range` START <= il <= END (default
  1..n_layer), at every token position, the BOS included.

So `direction.N` is `+ strength * v` on the residual stream at the output of block N, which is
our `blocks.N.hook_resid_post` (= `blocks.{N+1}.hook_resid_pre`; Hugging Face `model.layers[N]`'s
output, `hidden_states[N + 1]`): N, not N - 1. The embedding, `blocks.0.hook_resid_post` and any
hook off the residual stream (attn_out, mlp_out, resid_mid) cannot be expressed. The sign is kept
as is. analoglock steers `x + scale * v`; the exported tensor is `scale * v` with `scale` recorded,
so llama.cpp at strength 1 reproduces analoglock's steering at that scale (except that llama.cpp
also steers the BOS, which analoglock's position rules leave alone).

Provenance (model hash, hook, layer, source/aggregator, data, the scale measured best and its
measured effect) travels as JSON under `analoglock.provenance` in the GGUF metadata and in the
safetensors header, with flat `analoglock.*` copies in the GGUF for `gguf-dump` readers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from torch import Tensor

from analoglock.atomic import ARTIFACT_MODE, finite, save_tensors
from analoglock.hooks import residual_depth

GGUF_ARCH = "controlvector"  # llama.cpp's `general.architecture` for control vectors
HINT_KEY = f"{GGUF_ARCH}.model_hint"  # repeng's keys; informational, llama.cpp reads neither
LAYER_COUNT_KEY = f"{GGUF_ARCH}.layer_count"
PROVENANCE_KEY = "analoglock.provenance"
TENSOR_PREFIX = "direction."
FORMAT_VERSION = 1


class VectorError(ValueError):
    """A vector that cannot be exported or a file that is not a control vector."""


def control_layer(hook: str, n_layers: int) -> int:
    """llama.cpp's layer index N for a residual-stream hook (`direction.N` is added there).

    `blocks.N.hook_resid_post` -> N and `blocks.N.hook_resid_pre` -> N - 1; raises when llama.cpp
    cannot add at that hook (off the residual stream, before block 1's output, or past the model).
    """
    depth = residual_depth(hook)
    if depth is None:
        raise VectorError(
            f"Hook {hook!r} is not on the residual stream between blocks; a llama.cpp control "
            "vector is added to a block's output (blocks.N.hook_resid_post, N >= 1)."
        )
    layer = depth - 1
    if layer < 1:
        raise VectorError(
            f"Hook {hook!r} is the residual stream before block 1's output; llama.cpp never "
            "steers block 0's output or the embedding (direction.0 is refused). Use a hook at "
            "blocks.1.hook_resid_post or later."
        )
    if layer >= n_layers:
        raise VectorError(
            f"Hook {hook!r} is past the last block: the target model has {n_layers} layers, so "
            f"valid hooks are blocks.1.hook_resid_post .. blocks.{n_layers - 1}.hook_resid_post "
            f"(llama.cpp would silently ignore direction.{layer})."
        )
    return layer


def control_hook(layer: int) -> str:
    """The hook where llama.cpp adds `direction.<layer>`."""
    return f"blocks.{layer}.hook_resid_post"


@dataclass
class ControlVector:
    """Directions keyed by llama.cpp layer index N, each added at `blocks.N.hook_resid_post`."""

    directions: dict[int, Annotated[Tensor, "d_model"]]
    model_hint: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        """The vectors' length."""
        return int(next(iter(self.directions.values())).shape[0])

    def hooks(self) -> dict[str, Tensor]:
        """{hook name: vector}: where each direction acts, in analoglock's names."""
        return {control_hook(n): v for n, v in sorted(self.directions.items())}

    def check(self, n_layers: int | None = None, d_model: int | None = None) -> ControlVector:
        """Raise on anything llama.cpp (or the target model) would refuse or silently drop."""
        if not self.directions:
            raise VectorError("A control vector needs at least one direction.")
        lengths = {n: tuple(v.shape) for n, v in self.directions.items()}
        if any(len(s) != 1 for s in lengths.values()) or len(set(lengths.values())) != 1:
            raise VectorError(
                f"Every direction must be one 1-D vector of the same length; got shapes {lengths}."
            )
        if d_model is not None and self.d_model != d_model:
            raise VectorError(
                f"The vector has length {self.d_model} but the target model's d_model is "
                f"{d_model}; it was made for another model."
            )
        for n, v in self.directions.items():
            if n < 1 or (n_layers is not None and n >= n_layers):
                top = f"..{n_layers - 1}" if n_layers is not None else " or more"
                raise VectorError(
                    f"direction.{n}: llama.cpp layer indices run 1{top} for this model "
                    f"(block 0's output and the embedding cannot be steered)."
                )
            if not torch.isfinite(v).all():
                raise VectorError(f"direction.{n} holds NaN or inf.")
        return self

    def fwd_hooks(self, strength: float = 1.0) -> list[tuple[str, Callable]]:
        """(hook, fn) pairs that add `strength * direction` at every position, as llama.cpp does;
        pass them to `model.hooks(fwd_hooks=...)` or `generate(..., fwd_hooks=...)`."""

        def adder(v: Tensor) -> Callable:
            def add(x: Tensor, hook) -> Tensor:
                return x + strength * v.to(device=x.device, dtype=x.dtype)

            return add

        return [(hook, adder(v)) for hook, v in self.hooks().items()]


def control_vector(
    vectors: Mapping[str, Tensor],
    *,
    model: Mapping[str, Any],
    scale: float = 1.0,
    model_hint: str = "",
    source: str = "tensor",
    data: str | None = None,
    best_scale: float | None = None,
    effect: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ControlVector:
    """A checked `ControlVector` from {hook: [d_model] vector}, stored as `scale * v`.

    `model` is the identity the vectors were measured on (`ModelInfo.to_dict()`: spec, sha256,
    n_layers, d_model); every hook must map to a llama.cpp layer that exists in it. `best_scale`
    and `effect` are what a steering evaluation measured (None: not measured).
    """
    for key in ("n_layers", "d_model"):
        if key not in model:
            raise VectorError(f"model must say {key!r} (ModelInfo.to_dict() does); got {model}.")
    n_layers, d_model = int(model["n_layers"]), int(model["d_model"])
    directions: dict[int, Tensor] = {}
    hooks: dict[str, str] = {}
    for hook, v in vectors.items():
        v = torch.as_tensor(v).detach().float().cpu()
        if v.shape != (d_model,):
            raise VectorError(
                f"The vector at {hook!r} has shape {tuple(v.shape)}; the model "
                f"{model.get('spec', '')!r} needs one of shape ({d_model},)."
            )
        layer = control_layer(hook, n_layers)
        if layer in directions:
            raise VectorError(
                f"Two vectors map to llama.cpp layer {layer} ({hooks[str(layer)]}, {hook})."
            )
        directions[layer] = float(scale) * v
        hooks[str(layer)] = hook
    provenance = {
        "format_version": FORMAT_VERSION,
        "model": dict(model),
        "hooks": hooks,  # llama.cpp layer -> the hook the vector was measured at
        "source": source,
        "data": data,
        "scale": float(scale),
        "best_scale": None if best_scale is None else float(best_scale),
        "effect": None if effect is None else dict(effect),
        **dict(extra or {}),
    }
    return ControlVector(directions, model_hint, finite(provenance)).check(n_layers, d_model)


# ---------------------------------------------------------------- GGUF (llama.cpp)


def _flat_metadata(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Readable `analoglock.*` copies of the provenance's scalars (the JSON stays authoritative)."""
    out: dict[str, Any] = {}
    for key, value in provenance.items():
        if isinstance(value, Mapping):
            for k, v in value.items():
                if isinstance(v, str | int | float) and not isinstance(v, bool):
                    out[f"analoglock.{key}.{k}"] = v
        elif isinstance(value, str | int | float) and not isinstance(value, bool):
            out[f"analoglock.{key}"] = value
    return out


def save_gguf(cv: ControlVector, path: str | Path) -> Path:
    """Write a llama.cpp control vector GGUF atomically (temp file beside it, then rename)."""
    import gguf

    cv.check()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
        writer.add_string(HINT_KEY, cv.model_hint)
        writer.add_uint32(LAYER_COUNT_KEY, len(cv.directions))  # as repeng writes it
        writer.add_string(PROVENANCE_KEY, json.dumps(cv.provenance, allow_nan=False))
        for key, value in _flat_metadata(cv.provenance).items():
            if isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, int):
                writer.add_int64(key, value)
            else:
                writer.add_float32(key, value)
        for n, v in sorted(cv.directions.items()):
            writer.add_tensor(f"{TENSOR_PREFIX}{n}", v.float().numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, ARTIFACT_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _field(reader, key: str) -> Any:
    """A GGUF metadata value, or None when the key is absent."""
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _direction_layer(name: str, path: Path) -> int:
    """N of a `direction.N` tensor name, refused as llama.cpp refuses it."""
    head, _, tail = name.partition(".")
    if head != "direction" or not tail.isdigit():
        raise VectorError(
            f"{path}: tensor {name!r} is not named direction.<layer>; llama.cpp would refuse "
            "this control vector."
        )
    if int(tail) == 0:
        raise VectorError(f"{path}: direction.0 is refused by llama.cpp (layers start at 1).")
    return int(tail)


def load_gguf(path: str | Path) -> ControlVector:
    """Read a llama.cpp control vector (ours or another tool's), checked as llama.cpp checks it."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise VectorError(f"No control vector file at {path}.")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises bare ValueErrors / struct errors on foreign files
        raise VectorError(f"{path} is not a GGUF file ({err}).") from err
    arch = _field(reader, "general.architecture")
    if arch != GGUF_ARCH:
        raise VectorError(
            f"{path} is a GGUF file of architecture {arch!r}, not a control vector "
            f"({GGUF_ARCH!r}); is it a model file?"
        )
    directions: dict[int, Tensor] = {}
    for t in reader.tensors:
        n = _direction_layer(t.name, path)
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise VectorError(f"{path}: {t.name} is {t.tensor_type.name}; llama.cpp needs F32.")
        if len(t.shape) != 1:
            raise VectorError(f"{path}: {t.name} has shape {list(t.shape)}; it must be 1-D.")
        v = torch.from_numpy(np.array(t.data, dtype=np.float32))
        directions[n] = directions[n] + v if n in directions else v  # llama.cpp sums repeats
    if not directions:
        raise VectorError(f"{path} is a control vector with no direction tensors.")
    raw = _field(reader, PROVENANCE_KEY)
    provenance = json.loads(raw) if raw else {}
    return ControlVector(directions, _field(reader, HINT_KEY) or "", provenance).check()


# ---------------------------------------------------------------- safetensors (analoglock)


def save_safetensors(cv: ControlVector, path: str | Path) -> Path:
    """Write the same vector as safetensors (`direction.N` tensors, provenance in the header)."""
    cv.check()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {PROVENANCE_KEY: json.dumps(cv.provenance, allow_nan=False), HINT_KEY: cv.model_hint}
    tensors = {f"{TENSOR_PREFIX}{n}": v.float().contiguous() for n, v in cv.directions.items()}
    save_tensors(path, tensors, metadata=meta)
    return path


def load_safetensors(path: str | Path) -> ControlVector:
    """Read a vector written by `save_safetensors`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise VectorError(f"No vector file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as err:  # safetensors raises its own error types for foreign files
        raise VectorError(f"{path} is not a safetensors file ({err}).") from err
    if PROVENANCE_KEY not in meta:
        raise VectorError(
            f"{path} is a safetensors file but not an analoglock vector (no {PROVENANCE_KEY!r} "
            "in its header); it may be a lock artifact (give its run directory) or model weights."
        )
    directions = {_direction_layer(k, path): v.float() for k, v in tensors.items()}
    return ControlVector(
        directions, meta.get(HINT_KEY, ""), json.loads(meta[PROVENANCE_KEY])
    ).check()


def load_vector(path: str | Path) -> ControlVector:
    """A control vector from a `.gguf` or an analoglock `.safetensors` file."""
    suffix = Path(path).suffix
    if suffix == ".gguf":
        return load_gguf(path)
    if suffix == ".safetensors":
        return load_safetensors(path)
    raise VectorError(
        f"{path}: expected a .gguf control vector or an analoglock .safetensors vector."
    )


__all__ = [
    "GGUF_ARCH",
    "ControlVector",
    "VectorError",
    "control_hook",
    "control_layer",
    "control_vector",
    "load_gguf",
    "load_safetensors",
    "load_vector",
    "save_gguf",
    "save_safetensors",
]
