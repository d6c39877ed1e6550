"""Control vectors: llama.cpp's layer numbering, round trips through GGUF and safetensors, the
provenance they carry, the errors for what cannot travel, and the export command."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from analoglock.vectors import (
    GGUF_ARCH,
    PROVENANCE_KEY,
    VectorError,
    control_layer,
    control_vector,
    load_gguf,
    load_safetensors,
    load_vector,
    save_gguf,
    save_safetensors,
)

MODEL = {"spec": "tiny", "source": "local", "sha256": "ab" * 32, "n_layers": 4, "d_model": 64}
GEN = torch.Generator().manual_seed(0)
A, B = torch.randn(64, generator=GEN), torch.randn(64, generator=GEN)


def make(**kw):
    """Two vectors: one read at block 1's output, one at block 3's input (= block 2's output)."""
    args = dict(
        model=MODEL,
        scale=2.5,
        model_hint="llama",
        source="lock:learned (affine map)",
        data="fable_work",
        best_scale=2.5,
        effect={"analogue_mrr": 0.31, "fluency": 1.2},
    )
    return control_vector(
        {"blocks.1.hook_resid_post": A, "blocks.3.hook_resid_pre": B}, **{**args, **kw}
    )


def test_llama_cpp_layer_is_the_block_whose_output_is_steered():
    assert control_layer("blocks.1.hook_resid_post", 4) == 1
    assert control_layer("blocks.3.hook_resid_post", 4) == 3
    assert control_layer("blocks.3.hook_resid_pre", 4) == 2  # block 2's output
    assert control_layer("blocks.2.hook_out", 4) == 2


def test_gguf_round_trip_keeps_names_shapes_layers_values_and_provenance(tmp_path):
    cv = make()
    path = save_gguf(cv, tmp_path / "v.gguf")
    # Read with the gguf package itself, as llama.cpp's loader sees the file.
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == GGUF_ARCH
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"direction.1", "direction.2"}
    for t in tensors.values():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [64]
    np.testing.assert_array_equal(tensors["direction.1"].data, (2.5 * A).numpy())
    np.testing.assert_array_equal(tensors["direction.2"].data, (2.5 * B).numpy())
    prov = json.loads(reader.fields[PROVENANCE_KEY].contents())
    assert prov["model"]["sha256"] == "ab" * 32 and prov["model"]["spec"] == "tiny"
    assert prov["hooks"] == {"1": "blocks.1.hook_resid_post", "2": "blocks.3.hook_resid_pre"}
    assert (prov["source"], prov["data"], prov["scale"], prov["best_scale"]) == (
        "lock:learned (affine map)", "fable_work", 2.5, 2.5,
    )  # fmt: skip
    assert prov["effect"] == {"analogue_mrr": 0.31, "fluency": 1.2}
    assert reader.fields["analoglock.model.sha256"].contents() == "ab" * 32  # flat copy

    back = load_gguf(path)
    assert back.model_hint == "llama" and back.provenance == cv.provenance
    assert set(back.directions) == {1, 2}
    assert torch.equal(back.directions[1], 2.5 * A) and torch.equal(back.directions[2], 2.5 * B)
    assert set(back.hooks()) == {"blocks.1.hook_resid_post", "blocks.2.hook_resid_post"}


def test_safetensors_round_trip_and_header(tmp_path):
    from safetensors import safe_open

    cv = make()
    path = save_safetensors(cv, tmp_path / "v.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"direction.1", "direction.2"}
        assert json.loads(f.metadata()[PROVENANCE_KEY]) == cv.provenance
    back = load_vector(path)
    assert back.provenance == cv.provenance and back.model_hint == "llama"
    for n in (1, 2):
        assert torch.equal(back.directions[n], cv.directions[n])


def test_a_foreign_control_vector_loads_and_repeats_add_up(tmp_path):
    """A repeng-style file (no provenance) loads; a repeated layer sums, as in llama.cpp."""
    w = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_tensor("direction.3", np.ones(8, np.float32))
    w.add_tensor("direction.03", np.ones(8, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    cv = load_gguf(tmp_path / "f.gguf")
    assert cv.provenance == {} and torch.equal(cv.directions[3], torch.full((8,), 2.0))


def test_applied_as_llama_cpp_does_equals_adding_to_the_hf_layer_output(tiny_model, tiny_dir):
    """direction.N acts on Hugging Face `model.layers[N]`'s output (llama.cpp's block N)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    cv = make(scale=3.0)
    toks = tiny_model.to_tokens("Once upon a time, a tortoise")
    with tiny_model.hooks(fwd_hooks=cv.fwd_hooks(strength=0.5)):
        ours = tiny_model(toks)
    handles = [
        hf.model.layers[n].register_forward_hook(lambda m, i, out, v=v: out + 0.5 * v)
        for n, v in cv.directions.items()
    ]
    try:
        with torch.no_grad():
            ref = hf(toks).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, tiny_model(toks), atol=1e-3)  # it did steer


@pytest.mark.parametrize(
    ("hook", "match"),
    [
        ("blocks.4.hook_resid_post", "past the last block: the target model has 4 layers"),
        ("blocks.9.hook_resid_pre", "past the last block"),
        ("blocks.0.hook_resid_post", "never steers block 0"),
        ("blocks.1.hook_resid_pre", "never steers block 0"),
        ("hook_embed", "never steers block 0"),
        ("blocks.2.hook_attn_out", "not on the residual stream"),
        ("blocks.2.hook_resid_mid", "not on the residual stream"),
    ],
)
def test_hooks_llama_cpp_cannot_steer_are_refused(hook, match):
    with pytest.raises(VectorError, match=match):
        control_vector({hook: A}, model=MODEL)


def test_wrong_length_and_clashing_layers_are_refused(tmp_path):
    with pytest.raises(VectorError, match=r"shape \(63,\).*needs one of shape \(64,\)"):
        control_vector({"blocks.1.hook_resid_post": A[:63]}, model=MODEL)
    with pytest.raises(VectorError, match="Two vectors map to llama.cpp layer 2"):
        control_vector({"blocks.2.hook_resid_post": A, "blocks.3.hook_resid_pre": B}, model=MODEL)
    with pytest.raises(VectorError, match="n_layers"):
        control_vector({"blocks.1.hook_resid_post": A}, model={"spec": "x", "d_model": 64})
    with pytest.raises(VectorError, match="d_model is 32"):
        make().check(d_model=32)


def _gguf(path, arch: str, tensors: dict[str, np.ndarray]):
    w = gguf.GGUFWriter(str(path), arch)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_files_that_are_not_control_vectors_are_refused(tmp_path):
    model = _gguf(tmp_path / "model.gguf", "llama", {"token_embd.weight": np.ones((4, 8), np.float32)})  # fmt: skip
    with pytest.raises(VectorError, match="architecture 'llama', not a control vector"):
        load_gguf(model)
    (tmp_path / "text.gguf").write_text("not a gguf")
    with pytest.raises(VectorError, match="is not a GGUF file"):
        load_gguf(tmp_path / "text.gguf")
    zero = _gguf(tmp_path / "zero.gguf", GGUF_ARCH, {"direction.0": np.ones(8, np.float32)})
    with pytest.raises(VectorError, match=r"direction\.0 is refused"):
        load_gguf(zero)
    odd = _gguf(tmp_path / "odd.gguf", GGUF_ARCH, {"steer.1": np.ones(8, np.float32)})
    with pytest.raises(VectorError, match="not named direction"):
        load_gguf(odd)
    flat = _gguf(tmp_path / "2d.gguf", GGUF_ARCH, {"direction.1": np.ones((2, 8), np.float32)})
    with pytest.raises(VectorError, match="must be 1-D"):
        load_gguf(flat)
    mixed = _gguf(
        tmp_path / "mixed.gguf",
        GGUF_ARCH,
        {"direction.1": np.ones(8, np.float32), "direction.2": np.ones(9, np.float32)},
    )
    with pytest.raises(VectorError, match="same length"):
        load_gguf(mixed)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(VectorError, match="not an analoglock vector"):
        load_safetensors(tmp_path / "w.safetensors")
    with pytest.raises(VectorError, match="expected a .gguf"):
        load_vector(tmp_path / "v.pt")
    with pytest.raises(VectorError, match="No control vector file"):
        load_gguf(tmp_path / "missing.gguf")


# ---------------------------------------------------------------- the command


def _lock_run(tmp_path, hook: str, n_layers: int = 4, steer: bool = True):
    from analoglock.lock.export import save_artifact
    from analoglock.lock.maps import build_mapper

    mapper = build_mapper("translation", d_model=64)
    with torch.no_grad():
        mapper.r.copy_(A)  # M(x) = x + A, so the learned vector is A
    run = tmp_path / "run"
    model = {**MODEL, "n_layers": n_layers, "d_vocab": 100}
    save_artifact(run, mapper, {"learned": A, "meandiff": B}, model=model, hook=hook,
                  extra={"dataset": "fable_work", "views": ["story"]})  # fmt: skip
    if steer:
        report = {
            "selection": {"lock": {"alpha": 0.5, "positions": "new"}, "meandiff": {"scale": 4.0}},
            "test": {"split": "test", "summary": {"arms": {
                "lock": {"analogue_mrr": {"value": 0.2, "lo": 0.1, "hi": 0.3}},
                "meandiff": {"analogue_mrr": {"value": 0.15, "lo": 0.1, "hi": 0.2}},
            }}},
        }  # fmt: skip
        (run / "steer.json").write_text(json.dumps(report))
    return run


def test_export_command_writes_a_control_vector_from_a_lock_run(tmp_path):
    from analoglock.cli.export_vector import run
    from tests.helpers import compose_cli

    lock = _lock_run(tmp_path, "blocks.2.hook_resid_post")
    result = run(compose_cli("export_vector", [f"src={lock}"]))
    assert result["written"] == [
        str(lock / "controlvector-learned.gguf"), str(lock / "controlvector-learned.safetensors")
    ]  # fmt: skip
    cv = load_gguf(lock / "controlvector-learned.gguf")
    assert set(cv.directions) == {2} and torch.equal(cv.directions[2], 0.5 * A)  # best alpha
    p = cv.provenance
    assert p["best_scale"] == p["scale"] == 0.5 and p["data"] == "fable_work"
    assert p["effect"] == {"analogue_mrr": 0.2, "arm": "lock", "positions": "new", "split": "test"}
    assert p["hooks"] == {"2": "blocks.2.hook_resid_post"} and p["model"]["sha256"] == "ab" * 32
    assert p["source"].startswith("lock:learned") and cv.model_hint == "tiny"
    assert load_safetensors(lock / "controlvector-learned.safetensors").provenance == p

    md = run(compose_cli("export_vector", [f"src={lock}", "vector=meandiff", "scale=1"]))
    cv = load_vector(md["written"][0])
    assert torch.equal(cv.directions[2], B) and cv.provenance["best_scale"] == 4.0

    again = run(compose_cli("export_vector", [f"src={lock / 'controlvector-learned.safetensors'}",
                                              f"out={tmp_path / 'x.gguf'}", "scale=2"]))  # fmt: skip
    assert again["written"] == [str(tmp_path / "x.gguf")]
    assert torch.allclose(load_gguf(tmp_path / "x.gguf").directions[2], 2 * A)


def test_export_command_refuses_a_lock_whose_layer_llama_cpp_cannot_steer(tmp_path):
    from analoglock.cli.export_vector import run
    from tests.helpers import compose_cli

    lock = _lock_run(tmp_path, "blocks.0.hook_resid_post", steer=False)
    with pytest.raises(VectorError, match="never steers block 0"):
        run(compose_cli("export_vector", [f"src={lock}"]))
    with pytest.raises(VectorError, match="learned or meandiff"):
        run(compose_cli("export_vector", [f"src={lock}", "vector=center"]))
    with pytest.raises(VectorError, match="give a lock run directory"):
        run(compose_cli("export_vector", [f"src={tmp_path / 'nothing.bin'}"]))
