"""The decoding cache (`ExpandedKVCache`) on the tiny random Llama: same tokens, same hook values."""

from __future__ import annotations

import torch

from analoglock import generation, kv_cache, sampling
from analoglock.generation import _grouped_attention, generate
from analoglock.kv_cache import ExpandedKVLayer
from analoglock.sampling import nucleus_sample
from analoglock.tokens import encode_texts

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


def test_decoding_with_the_hf_modules_gives_the_bridges_tokens_and_puts_the_bridge_back(
    tiny_model, monkeypatch
):
    import pytest

    hf = tiny_model.original_model
    attn = hf.model.layers[0].self_attn
    seen: list[int] = []
    steps: list[int] = []
    hooks = [("hook_embed", lambda x, hook: seen.append(x.shape[1]))]
    for kw in ({}, {"do_sample": True, "temperature": 0.9, "top_p": 0.9, "seed": 3}):
        bridged = generate(tiny_model, PROMPTS, max_new_tokens=8, fwd_hooks=hooks, **kw)
        steps.clear()
        plain = generate(tiny_model, PROMPTS, max_new_tokens=8, hook_points=False,
                         on_step=lambda: steps.append(1), **kw)  # fmt: skip
        assert plain.new_tokens == bridged.new_tokens
        assert len(steps) == 8  # one tick per new token
    assert len(seen) == 2 * 8  # the bridged runs' hook: the prompt, then 7 steps, twice
    # while decoding, nothing of the bridge is in the model; afterwards all of it is back
    with generation.hf_modules(tiny_model) as n:
        assert n > 0 and type(hf.model.layers[0].self_attn).__module__.startswith("transformers")
        assert type(hf.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert hf.config._attn_implementation == "sdpa"
    assert hf.model.layers[0].self_attn is attn and hf.config._attn_implementation == "eager"
    with pytest.raises(RuntimeError, match="boom"), generation.hf_modules(tiny_model):
        raise RuntimeError("boom")
    assert hf.model.layers[0].self_attn is attn
    # the HF modules decode in decode's own loop; the bridge through transformers' generate
    calls, loops = [], []
    original, own = hf.generate, generation.decode
    monkeypatch.setattr(hf, "generate", lambda **kw: calls.append(kw) or original(**kw))
    monkeypatch.setattr(generation, "decode", lambda *a, **kw: loops.append(a) or own(*a, **kw))
    generate(tiny_model, PROMPTS, max_new_tokens=2, hook_points=False)
    assert len(loops) == 1 and not calls
    generate(tiny_model, PROMPTS, max_new_tokens=2)
    assert len(loops) == 1 and isinstance(calls[0]["cache"], kv_cache.ExpandedKVCache)
    # transformers' own sampling stays transformers'
    generate(tiny_model, PROMPTS, max_new_tokens=2, hook_points=False, do_sample=True,
             hf_sampling=True)  # fmt: skip
    assert len(loops) == 1 and len(calls) == 2 and "cache" not in calls[1]
    with pytest.raises(ValueError, match=r"decoder layers' inputs and outputs.*hook_embed"):
        generate(tiny_model, PROMPTS, max_new_tokens=2, fwd_hooks=hooks, hook_points=False)


def test_residual_hooks_run_on_the_hf_modules_as_at_the_hook_points(tiny_model, monkeypatch):
    """hook_resid_pre / hook_resid_post hooks, attached to the HF decoder layers for decode, see
    what the hook points see (the prompt in one pass in the batch's order, then one position per
    step; the hook point itself as `hook`), change the stream as they do there, and are gone
    afterwards."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(tiny_model.cfg.d_model, generator=g)
    seen: dict[bool, list] = {True: [], False: []}

    def hooks(direct: bool):
        def record(x, hook):
            seen[direct].append((hook.name, tuple(x.shape), x[:, -1, :3].clone()))

        def push(x, hook):
            return x + 3 * v

        return [("blocks.0.hook_resid_post", push), ("blocks.1.hook_resid_pre", record),
                ("blocks.1.hook_resid_post", record)]  # fmt: skip

    layers = [getattr(m, "original_component", m) for m in tiny_model.original_model.model.layers]

    def attached(m):
        return list(m._forward_hooks.values()), list(m._forward_pre_hooks.values())

    attached_before = [attached(m) for m in layers]
    loops = []
    own = generation.decode
    monkeypatch.setattr(generation, "decode", lambda *a, **kw: loops.append(kw) or own(*a, **kw))
    base = generate(tiny_model, PROMPTS, max_new_tokens=6)
    bridged = generate(tiny_model, PROMPTS, max_new_tokens=6, fwd_hooks=hooks(False))
    direct = generate(tiny_model, PROMPTS, max_new_tokens=6, fwd_hooks=hooks(True),
                      hook_points=False)  # fmt: skip
    assert direct.new_tokens == bridged.new_tokens != base.new_tokens
    assert len(loops) == 1 and loops[0]["prefill_rows"] == len(PROMPTS)  # one prompt pass
    assert [(n, s) for n, s, _ in seen[True]] == [(n, s) for n, s, _ in seen[False]]
    assert seen[True][0][1][:2] == (
        len(PROMPTS),
        max(len(r) for r in encode_texts(tiny_model, PROMPTS)),
    )
    for (_, _, a), (_, _, b) in zip(seen[True], seen[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # ours are gone (transformers may keep its own output-capturing hooks there)
    assert [attached(m) for m in layers] == attached_before
    assert generation.hf_hook_sites(tiny_model, ["blocks.1.hook_in", "blocks.0.hook_out"]) == [
        (1, 0), (0, 1)]  # fmt: skip
    assert generation.hf_hook_sites(tiny_model, ["blocks.0.hook_mlp_out"]) is None


def _transformers_distribution(scores, temperature, top_p, top_k):
    """The probabilities transformers samples from: its own warpers, in its own order."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = TemperatureLogitsWarper(temperature)(None, scores.clone())
    if top_k:
        out = TopKLogitsWarper(top_k)(None, out)
    return torch.softmax(TopPLogitsWarper(top_p)(None, out), dim=-1)


def test_nucleus_sample_draws_from_the_distribution_transformers_samples_from():
    torch.manual_seed(0)
    # rows from peaked (nucleus of 1-2 tokens) through wider than 3 candidates to wider than 16
    scores = torch.randn(6, 40) * torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.1])[:, None]
    n = 4000
    for temperature, top_p, top_k in ((0.8, 0.95, None), (1.3, 0.5, None), (0.8, 0.9, 12)):
        want = _transformers_distribution(scores, temperature, top_p, top_k)
        drawn = nucleus_sample(
            scores.repeat_interleave(n, 0), temperature, top_p, top_k, candidates=(3, 16)
        )
        got = torch.zeros_like(want)
        got.index_put_(
            (torch.arange(6).repeat_interleave(n), drawn), torch.ones(6 * n), accumulate=True
        )
        got /= n
        assert torch.all(got[want == 0] == 0), "drew a token outside transformers' nucleus"
        # total variation of 4000 draws from the same distribution: ~0.02 at most here
        assert (got - want).abs().sum(-1).max() / 2 < 0.05
    wide = _transformers_distribution(scores, 0.8, 0.95, None)
    # overwriting the scores (decode's own) changes no draw
    copy = scores.clone()
    for overwrite in (False, True):
        torch.manual_seed(1)
        drawn = nucleus_sample(copy, 0.8, 0.95, None, (3, 16), overwrite=overwrite)
        if not overwrite:
            assert torch.equal(copy, scores)
            first = drawn
    assert torch.equal(drawn, first) and torch.allclose(copy, scores / 0.8)
    width = (wide > 0).sum(-1)
    assert (width > 16).any() and ((width > 3) & (width <= 16)).any()  # every path was taken


def test_nucleus_sample_refuses_settings_transformers_would_not_sample_with():
    import pytest

    with pytest.raises(ValueError, match="temperature"):
        nucleus_sample(torch.randn(2, 5), temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        nucleus_sample(torch.randn(2, 5), top_p=1.5)


def test_sampling_with_a_nucleus_of_one_token_is_greedy_either_way(tiny_model):
    greedy = generate(tiny_model, PROMPTS, max_new_tokens=6).new_tokens
    for hf_sampling in (False, True):
        sampled = generate(tiny_model, PROMPTS, max_new_tokens=6, do_sample=True, temperature=0.7,
                           top_p=1e-6, seed=1, hf_sampling=hf_sampling)  # fmt: skip
        assert sampled.new_tokens == greedy


def test_decode_gives_transformers_tokens_with_repeats_penalised_and_rows_ending(tiny_model):
    """decode's loop against plain transformers generate on the HF modules: greedy with a
    repetition penalty, an EOS that ends some rows early (then padding), prefill in row chunks."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    hf = tiny_model.original_model
    prompts = [*PROMPTS, "a much longer prompt than the others, to pad the rest"]
    ids, mask = generation.encode_prompts(tiny_model, prompts)
    with generation.hf_modules(tiny_model):
        head = hf.get_output_embeddings()
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                          pad_token_id=0, eos_token_id=None, repetition_penalty=1.3)  # fmt: skip
        new = ref[:, ids.shape[1] :]
        eos = int(new[0, 3])  # a token row 0 makes at step 3: it ends there (others maybe too)
        ref_eos = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                              do_sample=False, pad_token_id=0, eos_token_id=eos,
                              repetition_penalty=1.3)[:, ids.shape[1] :]  # fmt: skip
        for rows in (1, 2, len(prompts)):
            got = generation.decode(hf, ids, mask, 10, None, 0, repetition_penalty=1.3,
                                    prefill_rows=rows)  # fmt: skip
            assert torch.equal(got, new)
            ended = generation.decode(hf, ids, mask, 10, eos, 0, repetition_penalty=1.3,
                                      prefill_rows=rows)  # fmt: skip
            assert torch.equal(ended, ref_eos)
        assert ended[0, 3] == eos and (ended[0, 4:] == 0).all()
        assert hf.get_output_embeddings() is head  # the output layer is put back
    # the penalty, in place, is transformers'
    scores, seen = torch.randn(3, 50), torch.randint(0, 50, (3, 7))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, scores.clone())
    sampling.penalise_repeats_(scores, seen, 1.3)
    assert torch.equal(scores, expected)


def test_decode_refuses_a_sliding_window_and_puts_the_output_layer_back_on_error(
    tiny_model, monkeypatch
):
    import pytest

    hf = tiny_model.original_model
    ids, mask = generation.encode_prompts(tiny_model, PROMPTS)
    with generation.hf_modules(tiny_model):
        head = hf.get_output_embeddings()
        linears = [m for m in hf.modules() if isinstance(m, torch.nn.Linear)]
        monkeypatch.setattr(hf.model, "forward", lambda *a, **kw: (_ for _ in ()).throw(
            RuntimeError("boom")))  # fmt: skip
        with pytest.raises(RuntimeError, match="boom"):
            generation.decode(hf, ids, mask, 4, None, 0)
        assert hf.get_output_embeddings() is head
        # every linear layer is the original again (decode swaps them for packed ones)
        assert [m for m in hf.modules() if isinstance(m, torch.nn.Linear)] == linears
        assert not any(isinstance(m, generation._DecodeLinear) for m in hf.modules())
        monkeypatch.undo()
        n = hf.config.num_hidden_layers
        monkeypatch.setattr(hf.config, "layer_types", ["sliding_attention"] * n, raising=False)
        assert not generation.decodable(hf)
        with pytest.raises(ValueError, match="full attention"):
            generation.decode(hf, ids, mask, 4, None, 0)


def test_prefix_layer_written_in_row_chunks_returns_the_concatenation():
    """Rows prefilled in chunks, then whole-batch steps, as `decode` drives it; no writing past
    the planned length."""
    import pytest

    layer = kv_cache.PrefixKVLayer(batch=4, capacity=7)
    k, v = torch.randn(4, 2, 4, 8), torch.randn(4, 2, 4, 8)
    for rows in (slice(0, 3), slice(3, 4)):
        layer.rows = rows
        keys, values = layer.update(k[rows], v[rows])
        assert torch.equal(keys, k[rows]) and torch.equal(values, v[rows])
    layer.advance(4)
    ks, vs = [k], [v]
    for _ in range(3):
        ks.append(torch.randn(4, 2, 1, 8))
        vs.append(torch.randn(4, 2, 1, 8))
        keys, values = layer.update(ks[-1], vs[-1])
        layer.advance(1)
        assert torch.equal(keys, torch.cat(ks, 2)) and torch.equal(values, torch.cat(vs, 2))
    assert layer.get_seq_length() == 7
    with pytest.raises(RuntimeError, match="holds 7 positions"):
        layer.update(ks[-1], vs[-1])


def test_prefix_cache_prefilled_by_length_skips_shared_padding():
    """`decode`'s prefill: rows taken out of order (an index), each chunk from the first column
    any of its rows has a token; the columns before read as zeros, whatever the buffer held."""
    cache = kv_cache.PrefixKVCache(n_layers=1, batch=3, capacity=6)
    layer = cache.layers[0]
    k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    for rows, pad in ((torch.tensor([2, 0]), 2), (torch.tensor([1]), 0)):
        cache.write_rows(rows, pad)
        assert cache.get_seq_length() == pad  # the mask's key length: pad + the chunk's width
        if pad:
            layer.lazy_initialization(k, v)
            layer._k.fill_(float("nan"))  # what an uninitialised buffer may hold
            layer._v.fill_(float("nan"))
        keys, values = layer.update(k[rows, :, pad:], v[rows, :, pad:])
        expect_k, expect_v = k[rows].clone(), v[rows].clone()
        expect_k[:, :, :pad] = 0
        expect_v[:, :, :pad] = 0
        assert torch.equal(keys, expect_k) and torch.equal(values, expect_v)
    cache.prefilled(5)
    step_k, step_v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    keys, _ = layer.update(step_k, step_v)
    assert cache.get_seq_length() == 5 and keys.shape == (3, 2, 6, 4)
    assert torch.equal(keys[1, :, :5], k[1]) and torch.equal(keys[:, :, 5:], step_k)
    assert (keys[[0, 2], :, :2] == 0).all() and torch.equal(keys[[0, 2], :, 2:5], k[[0, 2], :, 2:])


def test_top_k_by_blocks_equals_topk():
    """The block shortcut returns topk's values (and, for distinct values, its indices), also
    when every winner sits in one block or every value ties."""
    torch.manual_seed(0)
    x = torch.randn(5, 64 * 40)
    x[1, 640:704] += 10  # row 1: all of the top 5 in one block
    x[2] = 3.0  # row 2: all equal
    for k in (1, 5, 10):
        top, idx = sampling._top_k(x, k)
        ref_top, ref_idx = x.topk(k, dim=-1)
        assert torch.equal(top, ref_top)
        assert torch.equal(idx[[0, 1, 3, 4]], ref_idx[[0, 1, 3, 4]])
        assert torch.equal(x.gather(1, idx), top)  # the indices point at those values
        assert all(len(set(row)) == k for row in idx.tolist())  # distinct, ties too
    wide = torch.randn(2, 64 * 8)  # too few blocks to gain: topk itself
    assert torch.equal(sampling._top_k(wide, 5)[1], wide.topk(5, dim=-1).indices)


def test_decode_linear_gives_f_linears_bits_and_leaves_the_random_stream_alone():
    """`_DecodeLinear` (packed or transposed for a step's rows where the bits agree) returns
    `F.linear`'s exact numbers for every input shape, on contiguous and strided inputs, with and
    without a bias, and draws its bit-check probe from a generator of its own."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    for n_in, n_out, bias in ((32, 48, False), (96, 40, True), (200, 16, True)):
        lin = torch.nn.Linear(n_in, n_out, bias=bias)
        layer = generation._DecodeLinear(lin, rows=4, store={})
        steps = (torch.randn(4, 1, n_in), torch.randn(4, 5, n_in)[:, -1:])  # packed, if bits agree
        for x in (*steps, torch.randn(7, n_in), torch.randn(3, 5, n_in)):  # F.linear's own
            state = torch.random.get_rng_state()
            got = layer(x)
            assert torch.equal(torch.random.get_rng_state(), state)
            assert torch.equal(got, F.linear(x, lin.weight, lin.bias))
    zero = torch.nn.Linear(8, 6)
    torch.nn.init.zeros_(zero.bias)
    assert generation._DecodeLinear(zero, rows=2, store={}).bias is None  # a zero bias is skipped


def test_decode_linear_keeps_its_weight_copy_until_the_weight_changes():
    import pytest

    if not generation._mkl_linear_ok():
        pytest.skip("this torch has no MKL packed GEMM (not an x86 build)")
    x = torch.randn(4, 64)
    for kind in ("packed", "transposed"):
        lin, store = torch.nn.Linear(64, 32, bias=False), {}
        first = generation._DecodeLinear(lin, rows=4, store=store).copy(kind)
        again = generation._DecodeLinear(lin, rows=4, store=store).copy(kind)
        assert again is first and len(store) == 1  # a later decode call reuses it
        with torch.no_grad():
            lin.weight.mul_(2)  # edited in place: made again, and right
        layer = generation._DecodeLinear(lin, rows=4, store=store)
        assert layer.copy(kind) is not first and len(store) == 1
        torch.testing.assert_close(layer.run(kind, x), x @ lin.weight.T)
