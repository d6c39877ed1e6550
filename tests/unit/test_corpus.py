"""The story corpus: seeded, resumable, repairable after a kill, and loadable."""

from __future__ import annotations

import json

import pytest

from analoglock import corpus as corpus_mod
from analoglock.corpus import (
    batch_requests,
    corpus_stats,
    default_corpus_path,
    generate_corpus,
    load_corpus,
    settings_path,
)
from analoglock.data.loaders import DatasetFormatError
from analoglock.generation import Generation
from analoglock.model import model_info

SMALL = dict(batch_size=4, max_new_tokens=20, progress=False)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """One run to 300 tokens with seed 0: the file every other way of making it must equal."""
    return generate_corpus(
        tiny_model, 300, seed=0, out_path=tmp_path_factory.mktemp("c") / "a.jsonl", **SMALL
    )


def texts(path) -> list[str]:
    """The stories of a corpus file, in order."""
    return [d.text for d in load_corpus(path)]


def test_reaches_target_and_lines_are_complete(reference):
    rows = [json.loads(line) for line in reference.read_text(encoding="utf-8").splitlines()]
    assert sum(r["n_tokens"] for r in rows) >= 300
    assert [r["id"] for r in rows] == [f"corpus/{k}" for k in range(len(rows))]
    assert all(r["text"].strip() and r["prompt"].startswith(("Write", "Tell")) for r in rows)
    batches = [r["batch"] for r in rows]
    assert batches == sorted(batches) and batches[0] == 0
    assert corpus_stats(reference) == (len(rows), sum(r["n_tokens"] for r in rows))


def test_same_seed_same_file_and_other_seed_differs(tiny_model, reference, tmp_path):
    again = generate_corpus(tiny_model, 300, seed=0, out_path=tmp_path / "b.jsonl", **SMALL)
    assert again.read_bytes() == reference.read_bytes()
    other = generate_corpus(tiny_model, 1, seed=1, out_path=tmp_path / "c.jsonl", **SMALL)
    first = texts(other)  # one batch is enough to tell the seeds apart
    assert first != texts(reference)[: len(first)]
    assert batch_requests(1, 0, 4) != batch_requests(0, 0, 4)


def test_resume_equals_single_run(tiny_model, reference, tmp_path):
    path = tmp_path / "r.jsonl"
    generate_corpus(tiny_model, 150, seed=0, out_path=path, **SMALL)
    half = len(load_corpus(path))
    assert 0 < half < len(load_corpus(reference))
    generate_corpus(tiny_model, 300, seed=0, out_path=path, **SMALL)
    assert path.read_bytes() == reference.read_bytes()


def test_cut_off_last_line_is_repaired(tiny_model, reference, tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_bytes(reference.read_bytes() + b'{"id": "corpus/99", "te')  # a killed write
    settings_path(path).write_bytes(settings_path(reference).read_bytes())
    generate_corpus(tiny_model, 300, seed=0, out_path=path, **SMALL)
    assert path.read_bytes() == reference.read_bytes()


def test_full_file_returns_without_generating(tiny_model, reference, monkeypatch):
    before = reference.read_bytes()
    monkeypatch.setattr(corpus_mod, "generate", lambda *a, **k: pytest.fail("generated"))
    assert generate_corpus(tiny_model, 300, seed=0, out_path=reference, **SMALL) == reference
    assert reference.read_bytes() == before


def test_other_settings_refuse_to_resume(tiny_model, reference):
    with pytest.raises(ValueError, match="temperature"):
        generate_corpus(tiny_model, 10_000, seed=0, out_path=reference, temperature=0.5, **SMALL)


def test_a_file_drawn_by_the_old_sampler_is_not_extended_with_the_new_one(
    tiny_model, reference, tmp_path
):
    old = tmp_path / "old.jsonl"
    old.write_bytes(reference.read_bytes())
    meta = json.loads(settings_path(reference).read_text())
    assert (meta["sampler"], meta["decoder"]) == ("nucleus", "hf_modules")
    del meta["sampler"], meta["decoder"]  # what a file made before 2026-11-30 records
    settings_path(old).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sampler='transformers' \\(asked 'nucleus'\\)"):
        generate_corpus(tiny_model, 10_000, seed=0, out_path=old, **SMALL)
    with pytest.raises(ValueError, match="decoder='bridge' \\(asked 'hf_modules'\\)"):
        generate_corpus(tiny_model, 10_000, seed=0, out_path=old, sampler="transformers", **SMALL)
    # drawn as it was made, it grows (transformers' own warpers, through the bridge)
    n_before = len(texts(old))
    generate_corpus(tiny_model, 400, seed=0, out_path=old, sampler="transformers",
                    decoder="bridge", **SMALL)  # fmt: skip
    assert len(texts(old)) > n_before and json.loads(settings_path(old).read_text()) == meta
    with pytest.raises(ValueError, match="sampler must be one of"):
        generate_corpus(tiny_model, 400, seed=0, out_path=old, sampler="greedy", **SMALL)
    with pytest.raises(ValueError, match="decoder must be one of"):
        generate_corpus(tiny_model, 400, seed=0, out_path=old, decoder="tl", **SMALL)


def test_empty_completions_are_dropped(tiny_model, tmp_path, monkeypatch):
    def fake(model, prompts, **kwargs):
        done = ["", "  ", "Once upon a time.", "\n"][: len(prompts)]
        return Generation(list(prompts), done, [[] for _ in prompts])

    monkeypatch.setattr(corpus_mod, "generate", fake)
    path = generate_corpus(tiny_model, 10, out_path=tmp_path / "e.jsonl", **SMALL)
    docs = load_corpus(path)
    assert docs and {d.text for d in docs} == {"Once upon a time."}
    assert [d.meta["batch"] for d in docs] == list(range(len(docs)))


def test_load_round_trip(reference):
    rows = [json.loads(line) for line in reference.read_text(encoding="utf-8").splitlines()]
    docs = load_corpus(reference)
    assert [(d.id, d.text, d.meta["prompt"], d.meta["n_tokens"]) for d in docs] == [
        (r["id"], r["text"], r["prompt"], r["n_tokens"]) for r in rows
    ]


@pytest.mark.parametrize(
    "bad", ["not json", '{"id": "x", "text": 3, "prompt": "p", "n_tokens": 1, "batch": 0}', "[1]"]
)
def test_malformed_line_names_file_and_line(reference, tmp_path, bad):
    lines = reference.read_text(encoding="utf-8").splitlines()
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([lines[0], bad, *lines[1:]]) + "\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"bad\.jsonl:2: "):
        load_corpus(path)


def test_default_path_is_keyed_by_model_and_seed(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ANALOGLOCK_CACHE", str(tmp_path))
    sha = model_info(tiny_model).sha256[:12]
    assert default_corpus_path(tiny_model, 3) == tmp_path / "corpus" / f"{sha}-seed3.jsonl"


def test_interrupted_first_batch_leaves_no_empty_file(tiny_model, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_mod, "generate", killed)
    path = tmp_path / "killed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_corpus(tiny_model, 100, out_path=path, **SMALL)
    assert not path.exists()  # a 0-byte cache would later read as an empty corpus


def test_progress_moves_every_decoding_step(tiny_model, tmp_path, monkeypatch):
    shown_at_step, shown_at_batch_end = [], []

    class Watched(corpus_mod._StepBar):
        def on_step(self):
            super().on_step()
            shown_at_step.append(self.bar.n)

        def finish(self, made):
            super().finish(made)
            shown_at_batch_end.append(self.bar.n)

    monkeypatch.setattr(corpus_mod, "_StepBar", Watched)
    path = generate_corpus(
        tiny_model, 60, out_path=tmp_path / "p.jsonl", batch_size=4, max_new_tokens=20
    )
    assert len(shown_at_step) > 2 * len(shown_at_batch_end) > 0  # moves within a batch too
    assert shown_at_step[0] > 0  # from the first step on, not only when a batch is done
    assert shown_at_batch_end[-1] == corpus_stats(path)[1]  # true counts replace the estimates
