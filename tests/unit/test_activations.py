"""Harvester correctness on the tiny random Llama: padding, early stop, disk round trip, resume."""

from __future__ import annotations

import json

import pytest
import torch

from analoglock import activations as act_mod
from analoglock.activations import ActivationStore, harvest, harvest_to_disk, tokenize_documents
from analoglock.data import Document, load_documents
from analoglock.hooks import HookNameError, LayerOutOfRangeError, stop_layer, validate_hook
from analoglock.positions import AllTokens, LastToken, SpanTokens

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
    real = act_mod._run_batch
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(act_mod, "_run_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        harvest_to_disk(
            tiny_model, docs, [HOOK], tmp_path, batch_tokens=512, shard_rows=1, progress=False
        )
    partial = ActivationStore(tmp_path)
    assert not partial.complete and partial.meta["batches_done"] == 3
    monkeypatch.setattr(act_mod, "_run_batch", real)
    calls["n"] = 0
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
