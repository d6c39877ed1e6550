"""The foundation on the real SmolLM2-135M-Instruct: cached load, generation, harvest, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analoglock.activation_store import ActivationStore
from analoglock.activations import harvest, harvest_to_disk
from analoglock.data import load_documents
from analoglock.generation import chat_prompt, generate
from analoglock.hooks import LayerOutOfRangeError, validate_hook
from analoglock.model import EMBEDDED_MODELS, cache_root, dequantized_dir, embedded_gguf_path
from analoglock.positions import AllTokens, SpanTokens

PROMPTS = [
    "Once upon a time, a tortoise",
    "The quarterly report was late because",
    "Lions and tigers are",
]


def test_identity_and_cache(smollm2):
    info = smollm2.analoglock_info
    assert (info.source, info.n_layers, info.d_model, info.d_vocab) == ("embedded", 30, 576, 49152)
    cached = cache_root() / "dequantized" / info.sha256[:16]
    assert (cached / "model.safetensors").exists() and (cached / "config.json").exists()
    assert dequantized_dir(embedded_gguf_path("smollm2"), info.sha256) == cached


@pytest.fixture(scope="module")
def plain_hf(smollm2):
    """The same cached weights loaded by Hugging Face alone, with no TransformerLens wrapping."""
    from transformers import AutoModelForCausalLM

    path = cache_root() / "dequantized" / smollm2.analoglock_info.sha256[:16]
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def test_cached_weights_equal_fresh_dequantization(plain_hf):
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path("smollm2")
    fresh = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=EMBEDDED_MODELS["smollm2"].filename
    )
    ours = plain_hf.state_dict()
    fresh_sd = fresh.state_dict()
    assert set(ours) == set(fresh_sd)
    for name, p in fresh_sd.items():
        assert torch.equal(ours[name], p), name


def test_greedy_generation_equals_hugging_face(smollm2, plain_hf):
    ours = generate(smollm2, PROMPTS, max_new_tokens=24)
    # the corpus's path: decode's own loop over the HF modules, the prompts batched and padded
    unhooked = generate(smollm2, PROMPTS, max_new_tokens=24, hook_points=False, batch_size=2)
    assert unhooked.new_tokens == ours.new_tokens
    eos = smollm2.tokenizer.eos_token_id
    for prompt, new in zip(PROMPTS, ours.new_tokens, strict=True):
        toks = smollm2.to_tokens(prompt)
        with torch.no_grad():
            ref = plain_hf.generate(
                toks,
                attention_mask=torch.ones_like(toks),
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=eos,
            )[0, toks.shape[1] :].tolist()
        ref = ref[: ref.index(eos)] if eos in ref else ref
        assert new == ref, (prompt, smollm2.tokenizer.decode(new), smollm2.tokenizer.decode(ref))
    # Coherent English, not the repeated-dash failure of cached decoding through the bridge.
    assert all("----" not in c and len(c.split()) >= 5 for c in ours.completions), ours.completions


def test_chat_generation_answers(smollm2):
    out = generate(
        smollm2, [chat_prompt(smollm2, "Name a large cat that lives in Africa.")], max_new_tokens=20
    )
    assert "lion" in out.completions[0].lower() or "cheetah" in out.completions[0].lower(), (
        out.completions
    )


def test_harvest_matches_run_with_cache_and_round_trips(smollm2, tmp_path):
    docs = load_documents("fable_work", split="test", limit=8)
    hooks = ["blocks.6.hook_resid_post", "blocks.12.hook_mlp_out"]
    mem = harvest(smollm2, docs, hooks, AllTokens(include_bos=True), progress=False)
    toks = smollm2.to_tokens(docs[0].text)
    _, cache = smollm2.run_with_cache(toks)
    rows = mem.doc == 0
    for h in hooks:
        ref = cache[h][0] if h in cache else cache[smollm2.hook_dict[h].name][0]
        torch.testing.assert_close(mem.acts[h][rows], ref, atol=1e-3, rtol=1e-4)
    store = harvest_to_disk(
        smollm2, docs, hooks, tmp_path, SpanTokens(), dataset="fable_work", progress=False
    )
    roles = harvest(smollm2, docs, hooks, SpanTokens(), progress=False)
    back = ActivationStore(tmp_path).load()
    assert len(back) == len(roles) == store.meta["n_rows"] > 0
    for h in hooks:
        torch.testing.assert_close(back.acts[h], roles.acts[h], atol=1e-4, rtol=1e-4)


def test_layer_out_of_range_names_layer_count(smollm2):
    with pytest.raises(LayerOutOfRangeError, match="30 layers"):
        validate_hook(smollm2, "blocks.30.hook_resid_post")


def test_harvest_cli(tmp_path):
    out = tmp_path / "h"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "analoglock.cli.harvest",
        "data.limit=6",
        "positions=roles",
        "hooks=[blocks.3.hook_resid_post,blocks.9.hook_resid_post]",
        f"out_dir={out}",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    meta = json.loads((out / "meta.json").read_text())
    assert summary["n_rows"] == meta["n_rows"] > 0 and meta["complete"]
    assert meta["hooks"] == ["blocks.3.hook_resid_post", "blocks.9.hook_resid_post"]
    assert meta["model"]["spec"] == "smollm2" and meta["n_docs"] == 6
