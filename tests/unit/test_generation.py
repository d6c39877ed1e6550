"""The decoding cache (`ExpandedKVCache`) on the tiny random Llama: same tokens, same hook values."""

from __future__ import annotations

import torch

from analoglock import generation
from analoglock.generation import ExpandedKVLayer, _grouped_attention, generate

PROMPTS = ["Once upon a time, a tortoise", "The manager said", "Hi"]


def test_expanded_layer_returns_what_repeat_kv_of_the_concatenation_returns():
    from transformers.models.llama.modeling_llama import repeat_kv

    layer = ExpandedKVLayer(capacity=5, n_rep=3)  # 5 < 4 + 1 + 2: the buffer has to grow once
    ks, vs = [], []
    for t in (4, 1, 2):
        k, v = torch.randn(2, 2, t, 8), torch.randn(2, 2, t, 8)
        ks.append(k)
        vs.append(v)
        keys, values = layer.update(k, v)
        assert torch.equal(keys, repeat_kv(torch.cat(ks, dim=2), 3))
        assert torch.equal(values, repeat_kv(torch.cat(vs, dim=2), 3))
    assert layer.get_seq_length() == 7


def test_greedy_and_sampled_tokens_equal_the_default_cache(tiny_model):
    assert _grouped_attention(tiny_model)  # the tiny Llama takes the expanded cache
    for kw in ({}, {"do_sample": True, "temperature": 0.9, "top_p": 0.9, "seed": 3}):
        fast = generate(tiny_model, PROMPTS, max_new_tokens=8, **kw)
        default = generate(tiny_model, PROMPTS, max_new_tokens=8, fast_cache=False, **kw)
        assert fast.new_tokens == default.new_tokens
    groups = [m.num_key_value_groups for m in _grouped_attention(tiny_model)]
    assert groups == [2] * 4  # restored after generating (4 heads over 2 kv heads)


def test_hooks_see_the_same_patterns_with_either_cache(tiny_model):
    def run(fast: bool) -> list[torch.Tensor]:
        seen = []
        hooks = [("blocks.2.attn.hook_pattern", lambda x, hook: seen.append(x.clone()))]
        generate(tiny_model, PROMPTS[:2], max_new_tokens=4, fwd_hooks=hooks, fast_cache=fast)
        return seen

    fast, default = run(True), run(False)
    assert len(fast) == len(default) == 4  # the prompt, then one position per step
    assert all(torch.equal(a, b) for a, b in zip(fast, default, strict=True))


def test_falls_back_to_the_default_cache_when_it_does_not_fit(tiny_model, monkeypatch):
    calls = []
    original = tiny_model.original_model.generate

    def spy(**kw):
        calls.append(kw)
        return original(**kw)

    monkeypatch.setattr(tiny_model.original_model, "generate", spy)
    fast = generate(tiny_model, PROMPTS, max_new_tokens=4)
    monkeypatch.setattr(generation, "available_memory", lambda device: 1024)
    small = generate(tiny_model, PROMPTS, max_new_tokens=4)
    assert "cache" in calls[0] and "cache" not in calls[1]
    assert fast.new_tokens == small.new_tokens
