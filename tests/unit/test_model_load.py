"""The fast load path: the GGUF hash kept per file identity, the dequantized cache read
zero-copy, the tokenizer read once; each equal to the slow way it replaces."""

from __future__ import annotations

import os

import pytest
import torch

from analoglock import model as M


def test_file_hash_is_computed_once_per_file_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("ANALOGLOCK_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"gguf" * 1000)
    assert M.cached_file_sha256(f) == M.file_sha256(f)
    real = M.file_sha256
    monkeypatch.setattr(M, "file_sha256", lambda path: pytest.fail("hashed again"))
    assert M.cached_file_sha256(f) == real(f)  # same identity: read from the record
    f.write_bytes(b"ggu2" * 1000)  # rewritten in place: new mtime/ctime, so hashed again
    os.utime(f, ns=(1, 1))
    monkeypatch.setattr(M, "file_sha256", real)
    assert M.cached_file_sha256(f) == real(f)


@pytest.fixture(scope="module")
def dequantized_tiny(tmp_path_factory):
    """A tiny Llama (tied embedding) written the way the dequantized GGUF cache is written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import TINY_CONFIG, embedded_tokenizer

    tok = embedded_tokenizer()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **TINY_CONFIG)).eval()
    dest = tmp_path_factory.mktemp("deq") / "cache"
    M._atomic_save_pretrained(hf, tok, dest)
    return dest


def test_dequantized_cache_loads_equal_to_from_pretrained(dequantized_tiny):
    from transformers import AutoModelForCausalLM

    ours = M.load_dequantized(dequantized_tiny)
    ref = AutoModelForCausalLM.from_pretrained(dequantized_tiny, attn_implementation="eager")
    assert not ours.training and ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.config.to_dict() == ref.config.to_dict()
    ids = torch.tensor([[1, 400, 52, 9000, 7]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    half = M.load_dequantized(dequantized_tiny, torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_a_cache_it_cannot_read_strictly_falls_back(dequantized_tiny, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    odd = tmp_path / "odd"
    shutil.copytree(dequantized_tiny, odd)
    state = load_file(odd / "model.safetensors")
    state["extra.weight"] = torch.zeros(2)  # a key the model does not have
    save_file(state, odd / "model.safetensors")
    loaded = M.load_dequantized(odd)  # from_pretrained ignores the extra key
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_the_bridge_keeps_the_tokenizer_it_is_given(tiny_dir):
    from transformer_lens.utilities.tokenize_utils import get_tokenizer_with_bos

    _, tok, _, _ = M.load_hf(tiny_dir, add_bos_token=True)
    assert get_tokenizer_with_bos(tok) is tok  # no second read of the tokenizer at boot
    plain = M.load_hf(tiny_dir)[1]
    assert get_tokenizer_with_bos(plain) is not plain  # what load_model used to pay for
    model = M.load_model(tiny_dir)
    text = "Once upon a time"
    assert model.tokenizer(text)["input_ids"] == get_tokenizer_with_bos(plain)(text)["input_ids"]
