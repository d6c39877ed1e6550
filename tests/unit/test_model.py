"""Model loading, errors and generation on the tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from analoglock.generation import encode_prompts, generate
from analoglock.model import ModelNotFoundError, load_model, model_info, resolve_spec

PROMPTS = ["Once upon a time, a tortoise", "The manager said", "Hi"]


def test_loaded_model_is_frozen(tiny_model):
    assert not tiny_model.training
    assert all(not p.requires_grad for p in tiny_model.parameters())
    info = model_info(tiny_model)
    assert info.source == "local" and info.n_layers == 4 and info.d_model == 64
    assert len(info.sha256) == 64


def test_fingerprint_changes_with_weights(tiny_dir, tmp_path):
    from tests.helpers import tiny_model_dir

    other = load_model(str(tiny_model_dir(tmp_path / "other", seed=1)))
    same = load_model(tiny_dir)
    assert model_info(same).sha256 != model_info(other).sha256


def test_missing_and_unknown_specs_explain(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model("./no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="unreachable offline") as err:
        load_model("nobody/no-such-model")
    assert "smollm2" in str(err.value)
    assert resolve_spec("smollm2")[0] == "embedded"


def test_left_padding_and_bos(tiny_model):
    ids, mask = encode_prompts(tiny_model, PROMPTS)
    for row, m, p in zip(ids, mask, PROMPTS, strict=True):
        assert row[m.bool()].tolist() == tiny_model.to_tokens(p)[0].tolist()
        assert m[-1] == 1  # left padded: real tokens end every row


def _hf_greedy(hf, model, prompt: str, n: int) -> list[int]:
    toks = model.to_tokens(prompt)
    out = hf.generate(
        toks,
        attention_mask=torch.ones_like(toks),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=model.tokenizer.pad_token_id,
        eos_token_id=None,
    )
    return out[0, toks.shape[1] :].tolist()


def test_batched_greedy_equals_hf_one_by_one(tiny_model, tiny_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    got = generate(tiny_model, PROMPTS, max_new_tokens=8)
    for prompt, new in zip(PROMPTS, got.new_tokens, strict=True):
        ref = _hf_greedy(hf, tiny_model, prompt, 8)
        eos = tiny_model.tokenizer.eos_token_id
        assert new == (ref[: ref.index(eos)] if eos in ref else ref)


def test_hooks_act_during_generation_and_are_removed(tiny_model):
    base = generate(tiny_model, PROMPTS[:2], max_new_tokens=6)
    calls = []

    def noop(x, hook):
        calls.append(x.shape[1])
        return x

    same = generate(
        tiny_model, PROMPTS[:2], max_new_tokens=6, fwd_hooks=[("blocks.1.hook_resid_post", noop)]
    )
    assert same.new_tokens == base.new_tokens
    assert calls[0] > 1 and set(calls[1:]) == {1}  # prompt once, then one position per step

    def push(x, hook):
        return x + 50.0 * torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(0))

    steered = generate(
        tiny_model, PROMPTS[:2], max_new_tokens=6, fwd_hooks=[("blocks.1.hook_resid_post", push)]
    )
    assert steered.new_tokens != base.new_tokens
    again = generate(tiny_model, PROMPTS[:2], max_new_tokens=6)
    assert again.new_tokens == base.new_tokens  # no hook left attached


def test_sampling_is_seeded(tiny_model):
    a = generate(tiny_model, PROMPTS[:2], max_new_tokens=6, do_sample=True, seed=3)
    b = generate(tiny_model, PROMPTS[:2], max_new_tokens=6, do_sample=True, seed=3)
    c = generate(tiny_model, PROMPTS[:2], max_new_tokens=6, do_sample=True, seed=4)
    assert a.new_tokens == b.new_tokens
    assert a.new_tokens != c.new_tokens


def test_prompts_that_cannot_fit_are_refused_before_generating(tiny_model, monkeypatch):
    """Prompt + new tokens past the context (512 here), or a prefill over the memory budget,
    fail before any decoding, naming the prompt."""
    from analoglock import tokens
    from analoglock.tokens import ContextLengthError, encode_texts

    long = "word " * 480
    called = []
    monkeypatch.setattr(tiny_model.original_model, "generate", lambda **kw: called.append(kw))
    with pytest.raises(ContextLengthError, match=r"than 448 tokens \+ 64 new tokens: prompt 1 \('word word.*context is 512"):  # fmt: skip
        generate(tiny_model, ["Hi", long], max_new_tokens=64)
    monkeypatch.setattr(tokens, "available_memory", lambda device: 2**20)  # 1 MiB free
    with pytest.raises(ContextLengthError, match="GiB budget"):
        generate(tiny_model, ["Hi", "word " * 200], max_new_tokens=4)
    assert not called
    assert encode_texts(tiny_model, ["Hi", ""]) == [tiny_model.to_tokens("Hi")[0].tolist(), [1]]
