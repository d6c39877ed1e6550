"""Gemma-3 through the bridge, on a tiny random Gemma3ForCausalLM (tests/helpers.py).

Each test pins an assumption that Llama-shaped SmolLM2 never exercised: embeddings scaled by
sqrt(d_model) inside the embedding module, (1 + w) RMSNorms around attention and MLP, local
sliding-window layers interleaved with global ones (window 4 here, so every prompt reaches past
it), cached decoding through the bridge's reimplemented attention, and tied embeddings.
"""

from __future__ import annotations

import pytest
import torch

from analoglock.generation import generate
from analoglock.model import load_model, model_info

PROMPTS = ["Once upon a time, a slow tortoise and a proud hare", "The manager said", "Hi"]
LONG = "Once upon a time, a slow tortoise and a proud hare agreed to run a race."

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
    from tests.helpers import tiny_gemma3_dir

    return str(tiny_gemma3_dir(tmp_path_factory.mktemp("tiny_gemma3")))


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return load_model(gemma_dir)


@pytest.fixture(scope="module")
def hf(gemma_dir):
    """The same weights in plain Hugging Face, eager attention (what the bridge must equal)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma_dir, attn_implementation="eager").eval()


def test_boots_as_gemma3_with_every_attention_patched(gemma):
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    assert type(gemma.original_model).__name__ == "Gemma3ForCausalLM"
    info = model_info(gemma)
    assert (info.source, info.n_layers, info.d_model) == ("local", 4, 64)
    attns = [m for m in gemma.modules() if isinstance(m, AttentionBridge)]
    assert len(attns) == 4 and all(m._forward_pre_hooks for m in attns)  # the KV-cache alias


def test_hook_embed_is_the_scaled_embedding_and_the_first_residual(gemma, hf):
    toks = gemma.to_tokens(LONG)
    _, cache = gemma.run_with_cache(toks, names_filter=["hook_embed", "blocks.0.hook_resid_pre"])
    scaled = hf.model.embed_tokens.weight[toks] * 64**0.5  # Gemma multiplies by sqrt(d_model)
    torch.testing.assert_close(cache["hook_embed"], scaled)
    # hooks.residual_depth treats both as depth 0: they must be the same tensor values.
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])
    with torch.no_grad():
        hidden = hf(toks, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], hidden[0])


def test_local_and_global_layers_match_hugging_face(gemma, hf, gemma_dir):
    toks = gemma.to_tokens(LONG)
    assert toks.shape[1] > 8  # twice the window
    with torch.no_grad():
        ref = hf(toks).logits
        ours, cache = gemma.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    far = torch.ones(toks.shape[1], toks.shape[1]).tril(-4).bool()  # keys >= 4 tokens back
    for layer, kind in enumerate(hf.config.layer_types):
        reach = cache[f"blocks.{layer}.attn.hook_pattern"][0][:, far].abs().max()
        assert (reach == 0) == (kind == "sliding_attention"), (layer, kind, float(reach))
    # The window matters: the same weights with global attention everywhere give other logits.
    from transformers import AutoModelForCausalLM

    wide = AutoModelForCausalLM.from_pretrained(
        gemma_dir, attn_implementation="eager", sliding_window=512
    ).eval()
    with torch.no_grad():
        assert not torch.allclose(wide(toks).logits, ref, atol=1e-3)


def _hf_greedy(hf, model, prompt: str, n: int) -> list[int]:
    toks = model.to_tokens(prompt)
    with torch.no_grad():
        out = hf.generate(
            toks,
            attention_mask=torch.ones_like(toks),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
            eos_token_id=None,
        )
    ref = out[0, toks.shape[1] :].tolist()
    eos = model.tokenizer.eos_token_id
    return ref[: ref.index(eos)] if eos in ref else ref


def test_batched_cached_greedy_equals_hf_past_the_window(gemma, hf):
    """Left-padded batch, KV cache through the bridge, 12 new tokens (3 windows)."""
    got = generate(gemma, PROMPTS, max_new_tokens=12)
    # without the bridge too (the HF modules, SDPA, transformers' sliding-window cache)
    plain = generate(gemma, PROMPTS, max_new_tokens=12, hook_points=False)
    for prompt, new, new_plain in zip(PROMPTS, got.new_tokens, plain.new_tokens, strict=True):
        assert new == new_plain == _hf_greedy(hf, gemma, prompt, 12), prompt


def test_cached_decoding_needs_the_kv_alias_on_gemma3_too(gemma_dir, hf, monkeypatch):
    """Without load_model's pre-hook, Gemma-3's attention bridge drops the cache as Llama's does."""
    from analoglock import model as model_mod

    monkeypatch.setattr(model_mod, "_pass_kv_cache_to_bridge_attention", lambda bridge: 0)
    broken = load_model(gemma_dir)
    got = generate(broken, PROMPTS, max_new_tokens=12)
    assert any(
        new != _hf_greedy(hf, broken, p, 12) for p, new in zip(PROMPTS, got.new_tokens, strict=True)
    )


def test_tied_embeddings_survive_the_dequantized_cache(gemma, hf, tmp_path):
    """The cache writer stores a tied tensor once; reloading must tie it again, and the
    architecture the bridge needs must be named even when the config had none."""
    import json

    from transformers import AutoModelForCausalLM

    from analoglock.model import _atomic_save_pretrained

    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(gemma.W_U, gemma.W_E.T)
    hf.config.architectures = None  # as the GGUF loader leaves it for gemma3_text
    try:
        _atomic_save_pretrained(hf, gemma.tokenizer, tmp_path / "cache")
    finally:
        hf.config.architectures = ["Gemma3ForCausalLM"]
    config = json.loads((tmp_path / "cache" / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "cache", attn_implementation="eager")
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    for name, p in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name


def test_unembedding_folds_in_the_final_norm_gain(gemma):
    from analoglock.unembed import unembedding

    toks = gemma.to_tokens(LONG)
    _, cache = gemma.run_with_cache(toks, names_filter="blocks.3.hook_resid_post")
    x = cache["blocks.3.hook_resid_post"][0]
    logits = gemma.unembed(gemma.ln_final(x[None]))[0]
    normed = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(normed @ unembedding(gemma), logits, atol=1e-4, rtol=1e-4)


def test_harvest_and_a_steering_hook_equal_their_hf_counterparts(gemma, hf):
    from tests.helpers import harvest_shipped, shipped_docs

    hook = "blocks.1.hook_resid_post"
    mem = harvest_shipped(gemma, hook, n=2)
    doc = shipped_docs(n=1)[0]
    toks = gemma.to_tokens(doc.text)
    with torch.no_grad():
        hidden = hf(toks, output_hidden_states=True).hidden_states
    rows = mem.doc == 0  # hidden_states[2] is layer 1's output: blocks.1.hook_resid_post
    ref_rows = hidden[2][0, mem.pos[rows]]
    torch.testing.assert_close(mem.acts[hook][rows], ref_rows, atol=1e-4, rtol=1e-4)

    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    base = gemma(toks)
    with gemma.hooks(fwd_hooks=[(hook, lambda x, hook: x + 0.0 * v)]):
        assert torch.equal(gemma(toks), base)  # scale 0 is the unsteered model, exactly
    with gemma.hooks(fwd_hooks=[(hook, lambda x, hook: x + 3.0 * v)]):
        steered = gemma(toks)
    handle = hf.model.layers[1].register_forward_hook(lambda m, i, out: out + 3.0 * v)
    try:
        with torch.no_grad():
            ref = hf(toks).logits
    finally:
        handle.remove()
    assert not torch.allclose(steered, base, atol=1e-2)
    torch.testing.assert_close(steered, ref, atol=1e-4, rtol=1e-4)
