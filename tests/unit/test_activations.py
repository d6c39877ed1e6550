"""Harvester correctness on the tiny random Llama: padding, early stop, disk round trip, resume."""

from __future__ import annotations

import json

import pytest
import torch

from analoglock import activations as act_mod
from analoglock.activation_store import ActivationStore
from analoglock.activations import harvest, harvest_to_disk, tokenize_documents
from analoglock.data import Document, load_documents
from analoglock.hooks import HookNameError, LayerOutOfRangeError, stop_layer, validate_hook
from analoglock.positions import AllTokens, LastToken, SpanTokens
from tests.helpers import interrupted_harvest

HOOK = "blocks.1.hook_resid_post"
TEXTS = [
    "The tortoise walked slowly.",
    "A hare, who was very proud of his speed, laughed at the tortoise and ran far ahead.",
    "Slow and steady wins the race.",
    "Fox.",
]


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return [Document(f"d{i}", t) for i, t in enumerate(TEXTS)]


def test_tokenization_matches_to_tokens(tiny_model, docs):
    for doc, tok in zip(docs, tokenize_documents(tiny_model, docs), strict=True):
        expected = tiny_model.to_tokens(doc.text)[0].tolist()
        assert tok.ids == expected
        assert tok.first_real == 1 and tok.offsets[0] == (0, 0)


def test_padded_batch_equals_alone(tiny_model, docs):
    together = harvest(tiny_model, docs, [HOOK], AllTokens(include_bos=True), progress=False)
    assert together.pos.shape[0] == sum(len(t.ids) for t in tokenize_documents(tiny_model, docs))
    for i, doc in enumerate(docs):
        alone = harvest(tiny_model, [doc], [HOOK], AllTokens(include_bos=True), progress=False)
        rows = together.doc == i
        assert torch.equal(together.pos[rows], alone.pos)
        torch.testing.assert_close(
            together.acts[HOOK][rows], alone.acts[HOOK], atol=1e-5, rtol=1e-4
        )


def test_matches_run_with_cache_and_tokens(tiny_model, docs):
    hooks = [HOOK, "blocks.2.hook_mlp_out", "blocks.0.hook_attn_out"]
    got = harvest(tiny_model, docs[:1], hooks, AllTokens(include_bos=True), progress=False)
    toks = tiny_model.to_tokens(docs[0].text)
    _, cache = tiny_model.run_with_cache(toks)
    for h in hooks:
        ref = cache[h][0] if h in cache else cache[tiny_model.hook_dict[h].name][0]
        torch.testing.assert_close(got.acts[h], ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(got.token, toks[0])


def test_last_token_rows_are_ordered_by_document(tiny_model, docs):
    got = harvest(tiny_model, docs, [HOOK], LastToken(), progress=False)
    assert got.doc.tolist() == list(range(len(docs)))
    lengths = [len(t.ids) for t in tokenize_documents(tiny_model, docs)]
    assert got.pos.tolist() == [n - 1 for n in lengths]


def test_span_rows_carry_span_index(tiny_model):
    docs = load_documents("fable_work", split="test", limit=6)
    got = harvest(tiny_model, docs, [HOOK], SpanTokens(), progress=False)
    assert len(got) > 0 and (got.span >= 0).all()
    for d, p, s in zip(got.doc.tolist(), got.pos.tolist(), got.span.tolist(), strict=True):
        span = docs[d].spans[s]
        lo, hi = tokenize_documents(tiny_model, [docs[d]])[0].offsets[p]
        assert lo < span.end and span.start < hi


def test_stop_layer():
    assert stop_layer(["blocks.1.hook_resid_post", "blocks.3.hook_mlp_out"], 30) == 4
    assert stop_layer(["hook_embed"], 30) == 1
    assert stop_layer(["blocks.29.hook_resid_post"], 30) is None
    assert stop_layer(["ln_final.hook_normalized"], 30) is None


def test_hook_errors_are_actionable(tiny_model):
    with pytest.raises(LayerOutOfRangeError, match="4 layers"):
        validate_hook(tiny_model, "blocks.7.hook_resid_post")
    with pytest.raises(HookNameError) as err:
        validate_hook(tiny_model, "blocks.2.hook_resid_postt")
    msg = str(err.value)
    assert "blocks.2.hook_resid_post" in msg and "blocks.2.hook_mlp_out" in msg
    assert "blocks.3." not in msg  # only that layer's names are listed
    with pytest.raises(HookNameError):
        harvest(tiny_model, [Document("x", "hi")], ["resid_post_7"], progress=False)


def test_disk_round_trip(tiny_model, docs, tmp_path):
    # Same batching on both paths, so storage must be bit-exact.
    mem = harvest(
        tiny_model, docs, [HOOK, "blocks.3.hook_resid_post"], batch_tokens=64, progress=False
    )
    store = harvest_to_disk(
        tiny_model,
        docs,
        [HOOK, "blocks.3.hook_resid_post"],
        tmp_path,
        dataset="toy",
        batch_tokens=64,
        shard_rows=7,
        progress=False,
    )
    assert store.complete and len(store) == len(mem)
    assert len(store.meta["shards"]) > 1
    reopened = ActivationStore(tmp_path).load()
    for h in mem.acts:
        assert torch.equal(reopened.acts[h], mem.acts[h])
    for key in ("doc", "pos", "token", "span"):
        assert torch.equal(getattr(reopened, key), getattr(mem, key))
    assert [d.text for d in reopened.docs] == TEXTS
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["model"]["sha256"] == tiny_model.analoglock_info.sha256
    assert meta["d_model"] == 64 and meta["dataset"] == "toy" and meta["n_docs"] == len(docs)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def test_resume_after_interruption(tiny_model, tmp_path, monkeypatch):
    docs = load_documents("fable_work", split="validation")
    full = harvest(tiny_model, docs, [HOOK], progress=False)
    interrupted_harvest(monkeypatch, tiny_model, docs, [HOOK], tmp_path, 4, batch_tokens=512, shard_rows=1)  # fmt: skip
    partial = ActivationStore(tmp_path)
    assert not partial.complete and partial.meta["batches_done"] == 3
    resumed = harvest_to_disk(
        tiny_model, docs, [HOOK], tmp_path, batch_tokens=512, shard_rows=1, progress=False
    )
    assert resumed.complete
    got = resumed.load()
    assert torch.equal(got.doc, full.doc) and torch.equal(got.pos, full.pos)
    torch.testing.assert_close(got.acts[HOOK], full.acts[HOOK], atol=1e-5, rtol=1e-4)


def test_refuses_to_mix_harvests(tiny_model, docs, tmp_path):
    harvest_to_disk(tiny_model, docs, [HOOK], tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="different harvest"):
        harvest_to_disk(tiny_model, docs, ["blocks.2.hook_resid_post"], tmp_path, progress=False)


def test_store_dtype_and_missing_hook(tiny_model, docs, tmp_path):
    store = harvest_to_disk(
        tiny_model, docs, [HOOK], tmp_path, store_dtype="bfloat16", progress=False
    )
    got = store.load()
    assert got.acts[HOOK].dtype == torch.bfloat16
    with pytest.raises(KeyError, match="not in this harvest"):
        store.load(["blocks.0.hook_resid_post"])
    with pytest.raises(FileNotFoundError, match="not a harvest directory"):
        ActivationStore(tmp_path / "nope")


def test_cli_domain_stats_stream_equals_in_memory(tiny_model, tmp_path):
    from analoglock.cli.harvest import domain_stats

    docs = load_documents("fable_work", split="test")
    store = harvest_to_disk(tiny_model, docs, [HOOK], tmp_path, shard_rows=50, progress=False)
    stats = domain_stats(store)[HOOK]
    acts = store.load()
    x = acts.acts[HOOK].double()
    is_work = torch.tensor([docs[i].meta["domain"] == "work" for i in acts.doc.tolist()])
    assert stats["work"]["rows"] == int(is_work.sum()) and stats["fable"]["rows"] == int(
        (~is_work).sum()
    )
    assert stats["fable"]["mean_norm"] == pytest.approx(
        float(x[~is_work].norm(dim=-1).mean()), abs=1e-3
    )
    cos = torch.nn.functional.cosine_similarity(x[~is_work].mean(0), x[is_work].mean(0), dim=0)
    assert stats["cos(mean fable, mean work)"] == pytest.approx(float(cos), abs=1e-4)


# --- bad inputs and faults: each gets an error that names what to fix, and leaves nothing ---------


def test_out_of_range_positions_are_an_error_not_an_empty_harvest(tiny_model, docs, tmp_path):
    from analoglock.activation_store import HarvestError
    from analoglock.positions import TokenIndices

    out = tmp_path / "h"
    with pytest.raises(
        HarvestError, match=r"TokenIndices\(indices=\[100000\]\).*token lengths are"
    ):
        harvest_to_disk(tiny_model, docs, [HOOK], out, TokenIndices([100000]), progress=False)
    assert not out.exists()  # refused before out_dir was made
    with pytest.raises(HarvestError, match="selects no token"):
        harvest(tiny_model, docs, [HOOK], TokenIndices([100000]), progress=False)
    with pytest.raises(HarvestError, match="No documents"):
        harvest_to_disk(tiny_model, [], [HOOK], out, progress=False)
    assert not out.exists()


def test_out_dir_that_is_a_file_is_refused(tiny_model, docs, tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        harvest_to_disk(tiny_model, docs, [HOOK], tmp_path / "taken", progress=False)
    with pytest.raises(NotADirectoryError, match="a parent of out_dir"):
        harvest_to_disk(tiny_model, docs, [HOOK], tmp_path / "taken" / "sub", progress=False)


def test_failed_start_leaves_nothing_behind(tiny_model, docs, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the first batch")

    monkeypatch.setattr(act_mod, "_run_batch", broken)
    with pytest.raises(RuntimeError, match="first batch"):
        harvest_to_disk(tiny_model, docs, [HOOK], tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_too_long_documents_are_refused_before_any_forward(tiny_model, monkeypatch):
    from analoglock.tokens import ContextLengthError, check_lengths, forward_bytes, max_tokens

    long = Document("long/0", "word " * 600)  # > the tiny model's 512-token context
    with pytest.raises(ContextLengthError, match=r"long/0 \(60\d tokens\).*context is 512 tokens.*max_length"):  # fmt: skip
        tokenize_documents(tiny_model, [long])
    assert len(tokenize_documents(tiny_model, [long], max_length=100)[0].ids) == 100  # asked
    called = []
    monkeypatch.setattr(act_mod, "_run_batch", lambda *a, **k: called.append(1))
    with pytest.raises(ContextLengthError):
        harvest(tiny_model, [long], [HOOK], max_length=None, progress=False)
    assert not called  # refused before the model ran
    # the memory budget: a forward over 300 tokens needs forward_bytes; half of it is too little
    need = forward_bytes(tiny_model.cfg, 300)
    assert max_tokens(tiny_model, budget_bytes=need) >= 300 > max_tokens(tiny_model, budget_bytes=need // 2)  # fmt: skip
    with pytest.raises(ContextLengthError, match="GiB budget"):
        check_lengths(tiny_model, [300], ["doc"], budget_bytes=need // 2)
    with pytest.raises(ContextLengthError, match="64 new tokens"):
        check_lengths(tiny_model, [500], ["prompt"], extra=64)


def test_incomplete_harvest_names_missing_batches_and_resume(tiny_model, tmp_path, monkeypatch):
    from analoglock.activation_store import IncompleteHarvestError

    docs = load_documents("fable_work", split="validation")
    interrupted_harvest(monkeypatch, tiny_model, docs, [HOOK], tmp_path, 3, dataset="fable_work", batch_tokens=512, shard_rows=1)  # fmt: skip
    store = ActivationStore(tmp_path)
    n = store.meta["n_batches"]
    with pytest.raises(IncompleteHarvestError, match=rf"batches 2 to {n - 1} of {n}.*analoglock-harvest.*out_dir={tmp_path}.*allow_incomplete"):  # fmt: skip
        store.require_complete()
    # a resumed harvest replays the batches it started with, even if asked for other ones
    resumed = harvest_to_disk(tiny_model, docs, [HOOK], tmp_path, dataset="fable_work", batch_tokens=4096, progress=False)  # fmt: skip
    assert resumed.complete and resumed.meta["n_batches"] == n
    assert torch.equal(resumed.load().pos, harvest(tiny_model, docs, [HOOK], progress=False).pos)


def test_truncated_or_short_shard_is_named(tiny_model, docs, tmp_path):
    from analoglock.activation_store import HarvestError

    store = harvest_to_disk(tiny_model, docs, [HOOK], tmp_path, shard_rows=7, progress=False)
    shard = tmp_path / store.meta["shards"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(HarvestError, match=rf"{shard.name}.*truncated or corrupt"):
        ActivationStore(tmp_path).load()
    shard.unlink()
    with pytest.raises(HarvestError, match=shard.name):
        ActivationStore(tmp_path).load()
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(HarvestError, match="meta.json is not valid JSON"):
        ActivationStore(tmp_path)


def test_artifacts_are_0644_and_json_is_strict(tmp_path):
    from analoglock.atomic import save_tensors, write_json

    write_json(tmp_path / "m.json", {"fvu": float("nan"), "x": [1.0, float("inf")], "ok": 0.5})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "fvu": None,
        "x": [1.0, None],
        "ok": 0.5,
    }
    save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)})
    for name in ("m.json", "t.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


def test_cli_refuses_empty_data_file_before_loading_the_model(tmp_path):
    from analoglock.cli.harvest import main
    from analoglock.data import DatasetFormatError
    from tests.helpers import compose_cli

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    out = tmp_path / "out"
    overrides = ["data=file", f"data.name={empty}", f"out_dir={out}", "model=hf",
                 "model.spec=/no/such/model"]  # fmt: skip
    with pytest.raises(DatasetFormatError, match=rf"{empty}: no documents"):
        main.__wrapped__(compose_cli("harvest", overrides))
    assert not out.exists()
    (tmp_path / "bad.txt").write_bytes(b"fine line\nna\xefve caf\xe9\n")
    overrides[1] = f"data.name={tmp_path / 'bad.txt'}"
    with pytest.raises(
        DatasetFormatError, match=r"bad.txt:2: not UTF-8 text \(byte 0xef at column 3\)"
    ):
        main.__wrapped__(compose_cli("harvest", overrides))
