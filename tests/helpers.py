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
