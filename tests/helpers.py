"""Builders for test fixtures."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def embedded_tokenizer():
    """The SmolLM2 tokenizer, read straight from the shipped GGUF (no model weights)."""
    from transformers import AutoTokenizer

    from analoglock.model import EMBEDDED_MODELS, embedded_gguf_path

    path = embedded_gguf_path("smollm2")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=EMBEDDED_MODELS["smollm2"].filename)


def tiny_model_dir(dest: Path, seed: int = 0) -> Path:
    """Save a random tiny LlamaForCausalLM with the real tokenizer as an HF model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = embedded_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), **TINY_CONFIG)
    model = LlamaForCausalLM(cfg)
    # Larger-than-default init so random activations are not all near zero.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


# Gemma-3's differences from Llama in miniature: embeddings scaled by sqrt(d_model) inside the
# embedding module, (1 + w) RMSNorms before and after attention and MLP, q/k norms, GELU-tanh,
# and local (sliding-window) layers interleaved with global ones, each with its own RoPE base.
# The window is 4 tokens so that ordinary test prompts already reach past it.
TINY_GEMMA3_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def tiny_gemma3_dir(dest: Path, seed: int = 0) -> Path:
    """Save a random tiny Gemma3ForCausalLM with the SmolLM2 tokenizer as an HF model directory."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = embedded_tokenizer()
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=len(tok), **TINY_GEMMA3_CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("norm.weight"):  # Gemma scales by (1 + w): 0 is the identity
                p.normal_(0, 0.3)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


# --- shared builders for the unit tests (bases, patching, reports, data) ----------------------


def shipped_docs(dataset: str = "fable_work", split: str | None = "test", n: int | None = None):
    """The first n documents of one split of a shipped dataset."""
    from analoglock.data import load_documents

    return load_documents(dataset, split=split)[:n]


def harvest_shipped(
    model, hook: str, dataset: str = "fable_work", split: str | None = "test", n: int | None = None
):
    """In-memory all-token harvest at `hook` of the first n documents of a shipped split."""
    from analoglock.activations import harvest

    return harvest(model, shipped_docs(dataset, split, n), [hook], progress=False)


def fit_pca(x: torch.Tensor, k: int, hook: str):
    """A PCA basis with k components fit on rows x at `hook`."""
    from analoglock.bases import PCABasis

    return PCABasis(k, hook=hook).fit(x)


class LineBasis(torch.nn.Module):
    """Features along given unit directions, code_i = weight_i * (x . u_i), decode = sum c_i u_i.

    A basis with a known answer: with two features on the same direction u and weights 1/2 each,
    ablating one removes half of x's component along u and ablating both removes all of it; with
    one feature of weight 1 on u = x / |x|, ablating it zeroes x. Quacks like `FeatureBasis`
    wherever patching needs it (encode, decode, directions, n_features, hook, d_model).
    """

    def __init__(self, directions: torch.Tensor, weights, hook: str):
        super().__init__()
        self.directions = directions.float()
        self.weights = torch.as_tensor(weights, dtype=torch.float32)
        self.hook = hook
        self.n_features, self.d_model = self.directions.shape

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.directions.T) * self.weights

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.directions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def last_residual(model, text: str) -> tuple[str, torch.Tensor]:
    """(last block's resid_post hook, its activation at the text's last position)."""
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    _, cache = model.run_with_cache(text, names_filter=hook)
    return hook, cache[hook][0, -1].float()


def orthonormal_to(u: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n unit vectors orthogonal to u and to each other (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.cat([u[:, None], torch.randn(len(u), n, generator=gen)], dim=1))
    return q[:, 1:].T.contiguous()


def compose_cli(config_name: str, overrides: list[str]):
    """An entry point's config as Hydra composes it from the shipped configs (no run dir)."""
    from hydra import compose, initialize_config_dir

    from analoglock.cli._conf import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name, overrides=overrides)


def interrupted_harvest(monkeypatch, model, docs, hooks, out, killed_at: int, **kwargs):
    """harvest_to_disk whose forward is killed (KeyboardInterrupt, as a Ctrl-C) at forward number
    `killed_at`; the forward is restored afterwards, so the same harvest can be resumed."""
    import pytest

    from analoglock import activations as act_mod

    real, calls = act_mod._run_batch, {"n": 0}

    def dying(*args, **kw):
        calls["n"] += 1
        if calls["n"] == killed_at:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    monkeypatch.setattr(act_mod, "_run_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        act_mod.harvest_to_disk(model, docs, hooks, out, progress=False, **kwargs)
    monkeypatch.setattr(act_mod, "_run_batch", real)


class FakeJudge:
    """Deterministic stand-in with the judge's interface: hashed bag-of-words embeddings."""

    def embed(self, texts):
        out = torch.full((len(texts), 32), 1e-3)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w)) % 32] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)
