"""Shipped datasets meet the issue's minimums and FORMAT.md; loaders reject malformed files.

Shipped data is checked against the raw JSONL (read here with `json`), not only through the
loaders, so a loader that silently drops or rewrites lines would fail these tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from analoglock.data import (
    DatasetFormatError,
    Document,
    StoryPair,
    available_datasets,
    concept_documents,
    load_concepts,
    load_documents,
    load_pairs,
    pair_documents,
    read_text_documents,
)
from analoglock.data.loaders import DATA_DIR, SPLITS

PAIRS = available_datasets()["pairs"]
CONCEPTS = available_datasets()["concepts"]

EXPECTED_CLASSES = {
    "animals": {"lion", "tiger", "bear", "animal"},
    "gender": {"male", "female"},
    "emotion": {"angry", "calm"},
    "language": {"en", "fr", "ru"},
    "truth": {"true", "false"},
}


def _raw(kind: str, name: str) -> list[dict]:
    """The shipped file's objects, parsed independently of the loaders."""
    path = DATA_DIR / kind / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _split_for_index(i: int) -> str:
    """FORMAT.md's rule: i % 20 in 0..13 train, 14..16 validation, 17..19 test."""
    r = i % 20
    return "train" if r <= 13 else "validation" if r <= 16 else "test"


def _check_ids_and_splits(name: str, items: list) -> None:
    """Ids are `<name>/<3-digit index>`, consecutive from 000; split follows the index rule."""
    ids = [it.id for it in items]
    assert len(set(ids)) == len(ids), f"{name}: duplicate ids"
    for i, it in enumerate(items):
        assert it.id == f"{name}/{i:03d}", f"{name}: line {i + 1} has id {it.id!r}"
        assert it.split == _split_for_index(i), f"{it.id}: split {it.split!r}"
    assert {it.split for it in items} == set(SPLITS), f"{name}: not every split is used"


# --- shipped datasets -------------------------------------------------------------------------


def test_shipped_dataset_names():
    assert "fable_work" in PAIRS
    assert len([n for n in PAIRS if n != "fable_work"]) >= 2
    assert set(EXPECTED_CLASSES) <= set(CONCEPTS)


def test_fable_work_has_at_least_150_pairs():
    assert len(load_pairs("fable_work")) >= 150


@pytest.mark.parametrize("name", PAIRS)
def test_pair_dataset_loads_and_follows_format(name):
    pairs = load_pairs(name)
    raw = _raw("pairs", name)
    assert len(pairs) == len(raw) > 0  # no line dropped
    assert all(isinstance(p, StoryPair) for p in pairs)
    _check_ids_and_splits(name, pairs)
    for p, obj in zip(pairs, raw, strict=True):
        assert (p.a, p.b) == (obj["a"], obj["b"])
        assert p.roles == tuple(tuple(r) for r in obj["roles"])
        assert 2 <= len(p.roles) <= 4, f"{p.id}: {len(p.roles)} roles"


@pytest.mark.parametrize("name", PAIRS)
def test_pair_splits_are_disjoint_and_cover_the_dataset(name):
    by_split = {s: {p.id for p in load_pairs(name, split=s)} for s in SPLITS}
    assert all(by_split.values())
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["validation"] & by_split["test"]
    assert set().union(*by_split.values()) == {p.id for p in load_pairs(name)}


@pytest.mark.parametrize("name", CONCEPTS)
def test_concept_dataset_loads_and_follows_format(name):
    cs = load_concepts(name)
    raw = _raw("concepts", name)
    assert cs.name == name
    assert len(cs.items) == len(raw)
    _check_ids_and_splits(name, list(cs.items))
    if name in EXPECTED_CLASSES:
        assert set(cs.classes) == EXPECTED_CLASSES[name]
    for cls in cs.classes:
        n = sum(1 for it in cs.items if it.texts.get(cls))
        assert n >= 40, f"{name}: only {n} items for class {cls!r}"


@pytest.mark.parametrize("name", CONCEPTS)
def test_concept_splits_are_disjoint_and_cover_the_dataset(name):
    by_split = {s: {it.id for it in load_concepts(name, split=s).items} for s in SPLITS}
    assert all(by_split.values())
    assert sum(len(v) for v in by_split.values()) == len(set().union(*by_split.values()))
    assert set().union(*by_split.values()) == {it.id for it in load_concepts(name).items}


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="train, validation, test"):
        load_pairs("fable_work", split="dev")


# --- documents --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAIRS)
def test_pair_documents_role_spans_match_role_strings(name):
    pairs = load_pairs(name)
    docs = pair_documents(pairs, side="both", dataset=name)
    assert len(docs) == 2 * len(pairs)
    for pair, doc_a, doc_b in zip(pairs, docs[0::2], docs[1::2], strict=True):
        for side, doc, text in (("a", doc_a, pair.a), ("b", doc_b, pair.b)):
            assert doc.id == f"{pair.id}:{side}"
            assert doc.text == text
            assert doc.meta["pair"] == pair.id
            assert doc.meta["side"] == side
            assert doc.meta["split"] == pair.split
            assert doc.meta["dataset"] == name
            labels = {sp.label for sp in doc.spans}
            assert labels == {f"role{k}" for k in range(len(pair.roles))}  # every role found
            for sp in doc.spans:
                k = int(sp.label.removeprefix("role"))
                role = pair.roles[k][0 if side == "a" else 1]
                assert doc.text[sp.start : sp.end].lower() == role.lower(), (doc.id, sp)


def test_pair_documents_finds_every_occurrence_in_text_order():
    pair = StoryPair(
        "toy/000",
        "test",
        "original",
        a="The Hare ran. The tortoise walked. The hare slept.",
        b="The star raced. The junior plodded. The Star napped.",
        roles=(("hare", "star"), ("tortoise", "junior")),
    )
    only_a = pair_documents([pair], side="a")
    assert [d.meta["side"] for d in only_a] == ["a"]
    assert [(s.label, s.start, s.end) for s in only_a[0].spans] == [
        ("role0", 4, 8),
        ("role1", 18, 26),
        ("role0", 39, 43),
    ]
    only_b = pair_documents([pair], side="b")
    assert [(s.label, s.start, s.end) for s in only_b[0].spans] == [
        ("role0", 4, 8),
        ("role1", 20, 26),
        ("role0", 40, 44),
    ]
    both = pair_documents([pair], side="both")
    assert [d.id for d in both] == ["toy/000:a", "toy/000:b"]
    with pytest.raises(ValueError, match="side"):
        pair_documents([pair], side="c")


@pytest.mark.parametrize("name", CONCEPTS)
def test_concept_documents_spans(name):
    cs = load_concepts(name)
    raw = {obj["id"]: obj for obj in _raw("concepts", name)}
    docs = concept_documents(cs)
    assert len(docs) == len(cs.items) * len(cs.classes)
    for doc in docs:
        obj = raw[doc.meta["item"]]
        cls = doc.meta["class"]
        assert doc.meta["dataset"] == name
        assert doc.meta["split"] == obj["split"]
        if "template" in obj:
            fill = obj["fills"][cls]
            assert doc.text == obj["template"].replace("{x}", fill)
            assert [s.label for s in doc.spans] == ["concept"]
            assert doc.text[doc.spans[0].start : doc.spans[0].end] == fill
        else:
            assert doc.text == obj["texts"][cls]
            assert doc.spans == ()


def test_concept_documents_class_subset_and_unknown_class():
    cs = load_concepts("animals")
    docs = concept_documents(cs, ["lion", "bear"])
    assert {d.meta["class"] for d in docs} == {"lion", "bear"}
    assert len(docs) == 2 * len(cs.items)
    with pytest.raises(ValueError, match="lion, tiger, bear, animal"):
        concept_documents(cs, ["zebra"])


def test_load_documents_filters():
    docs = load_documents("animals", split="test", classes=["tiger"])
    assert docs and all(d.meta["split"] == "test" and d.meta["class"] == "tiger" for d in docs)
    assert len(docs) == len(load_concepts("animals", split="test").items)
    docs = load_documents("fable_work", side="b", limit=5)
    assert len(docs) == 5
    assert all(d.meta["side"] == "b" for d in docs)


# --- malformed files --------------------------------------------------------------------------


def _pair_line(i: int, **overrides) -> str:
    obj = {
        "id": f"bad/{i:03d}",
        "split": "train",
        "source": "original",
        "a": "The hare ran past the tortoise.",
        "b": "The star raced past the junior.",
        "roles": [["hare", "star"], ["tortoise", "junior"]],
    }
    obj.update(overrides)
    return json.dumps({k: v for k, v in obj.items() if v is not None})


def _concept_line(i: int, **overrides) -> str:
    obj = {
        "id": f"bad/{i:03d}",
        "split": "train",
        "template": "The {x} slept.",
        "fills": {"cat": "cat", "dog": "dog"},
    }
    obj.update(overrides)
    return json.dumps(obj)


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


PAIR_CASES = {
    "invalid_json": ([_pair_line(0), _pair_line(1), '{"id": "bad/002", "split": '], 3, "JSON"),
    "missing_field": ([_pair_line(0), _pair_line(1, b=None)], 2, "'b'"),
    "role_not_in_story": (
        [_pair_line(0), _pair_line(1, roles=[["hare", "star"], ["turtle", "junior"]])],
        2,
        "'turtle'",
    ),
    "role_only_inside_a_word": (
        [_pair_line(0, roles=[["hare", "star"], ["tort", "junior"]])],  # "tort" in "tortoise"
        1,
        "'tort'",
    ),
    "bad_split": ([_pair_line(0), _pair_line(1), _pair_line(2, split="dev")], 3, "'dev'"),
    "duplicate_id": ([_pair_line(0), _pair_line(1), _pair_line(1)], 3, "duplicate id 'bad/001'"),
    "blank_line": ([_pair_line(0), "", _pair_line(1)], 2, "blank line"),
    "roles_empty": ([_pair_line(0, roles=[])], 1, "roles"),
    "role_not_a_pair": ([_pair_line(0), _pair_line(1, roles=[["hare"]])], 2, "roles[0]"),
    "not_an_object": ([_pair_line(0), "[1, 2]"], 2, "JSON object"),
}


@pytest.mark.parametrize("case", PAIR_CASES)
def test_malformed_pairs_report_file_and_line(tmp_path, case):
    lines, lineno, detail = PAIR_CASES[case]
    path = _write(tmp_path, f"pairs_{case}.jsonl", lines)
    with pytest.raises(DatasetFormatError) as err:
        load_pairs(str(path))
    assert f"{path}:{lineno}:" in str(err.value)
    assert detail in str(err.value)


CONCEPT_CASES = {
    "invalid_json": ([_concept_line(0), _concept_line(1), "{not json}"], 3, "JSON"),
    "missing_fills": (
        [_concept_line(0), json.dumps({"id": "bad/001", "split": "train", "template": "{x}"})],
        2,
        "'fills'",
    ),
    "missing_texts": (
        [_concept_line(0), json.dumps({"id": "bad/001", "split": "test"})],
        2,
        "'texts'",
    ),
    "template_without_slot": (
        [_concept_line(0), _concept_line(1, template="The animal slept.")],
        2,
        "{x}",
    ),
    "template_with_two_slots": ([_concept_line(0, template="The {x} saw the {x}.")], 1, "{x}"),
    "class_mismatch": (
        [_concept_line(0), _concept_line(1), _concept_line(2, fills={"cat": "cat", "cow": "cow"})],
        3,
        "classes",
    ),
    "empty_fill": (
        [_concept_line(0), _concept_line(1, fills={"cat": "cat", "dog": ""})],
        2,
        "'dog'",
    ),
    "bad_split": ([_concept_line(0, split="Train")], 1, "'Train'"),
    "duplicate_id": ([_concept_line(0), _concept_line(0)], 2, "duplicate id"),
    "blank_line": ([_concept_line(0), _concept_line(1), "   "], 3, "blank line"),
}


@pytest.mark.parametrize("case", CONCEPT_CASES)
def test_malformed_concepts_report_file_and_line(tmp_path, case):
    lines, lineno, detail = CONCEPT_CASES[case]
    path = _write(tmp_path, f"concepts_{case}.jsonl", lines)
    with pytest.raises(DatasetFormatError) as err:
        load_concepts(str(path))
    assert f"{path}:{lineno}:" in str(err.value)
    assert detail in str(err.value)


def test_load_documents_reports_errors_in_user_files(tmp_path):
    bad_pairs = _write(tmp_path, "docs_pairs.jsonl", [_pair_line(0), _pair_line(1, split="x")])
    with pytest.raises(DatasetFormatError, match=re.escape(f"{bad_pairs}:2:")):
        load_documents(str(bad_pairs))
    bad_concepts = _write(tmp_path, "docs_concepts.jsonl", [_concept_line(0), "", _concept_line(2)])
    with pytest.raises(DatasetFormatError, match=re.escape(f"{bad_concepts}:2: blank line")):
        load_documents(str(bad_concepts))
    bad_first = _write(tmp_path, "docs_first.jsonl", ["{oops"])
    with pytest.raises(DatasetFormatError, match=re.escape(f"{bad_first}:1: not valid JSON")):
        load_documents(str(bad_first))


def test_load_documents_reads_valid_user_files(tmp_path):
    pairs = _write(tmp_path, "ok_pairs.jsonl", [_pair_line(0), _pair_line(1, split="test")])
    docs = load_documents(str(pairs), split="test", side="a")
    assert [d.id for d in docs] == ["bad/001:a"]
    assert docs[0].meta["dataset"] == "ok_pairs"
    concepts = _write(tmp_path, "ok_concepts.jsonl", [_concept_line(0), _concept_line(1)])
    docs = load_documents(str(concepts), classes=["dog"])
    assert [d.text for d in docs] == ["The dog slept.", "The dog slept."]
    assert [(s.start, s.end) for s in docs[0].spans] == [(4, 7)]


def test_unknown_dataset_lists_shipped_names():
    with pytest.raises(FileNotFoundError) as err:
        load_documents("no_such_dataset")
    for name in PAIRS + CONCEPTS:
        assert name in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        load_pairs("no_such_pairs")
    assert all(name in str(err.value) for name in PAIRS)
    with pytest.raises(FileNotFoundError) as err:
        load_concepts("no_such_concepts")
    assert all(name in str(err.value) for name in CONCEPTS)


# --- plain text files -------------------------------------------------------------------------


def test_read_text_documents_txt(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(
        "First text.\n\nSecond text\nover two lines.\n\n\n\n  Third.  \n", encoding="utf-8"
    )
    docs = read_text_documents(path)
    assert [d.text for d in docs] == ["First text.", "Second text\nover two lines.", "Third."]
    assert [d.id for d in docs] == ["notes/0", "notes/1", "notes/2"]
    assert all(d.spans == () for d in docs)
    assert [d.text for d in load_documents(str(path))] == [d.text for d in docs]


def test_read_text_documents_jsonl(tmp_path):
    path = _write(
        tmp_path,
        "texts.jsonl",
        [json.dumps({"text": "Alpha.", "id": "mine"}), "", json.dumps({"text": "Beta."})],
    )
    docs = read_text_documents(path)
    assert [(d.id, d.text) for d in docs] == [("mine", "Alpha."), ("texts/1", "Beta.")]
    assert all(isinstance(d, Document) for d in docs)
    assert [d.text for d in load_documents(str(path))] == ["Alpha.", "Beta."]


def test_read_text_documents_jsonl_errors(tmp_path):
    path = _write(
        tmp_path, "texts_bad.jsonl", [json.dumps({"text": "ok"}), json.dumps({"txt": "no"})]
    )
    with pytest.raises(DatasetFormatError, match=re.escape(f"{path}:2:") + r".*\"text\""):
        read_text_documents(path)
    with pytest.raises(FileNotFoundError):
        read_text_documents(tmp_path / "missing.txt")


def test_fable_work_has_enough_pairs_and_no_source_crosses_splits():
    """The lock needs >= 400 pairs; a fable retold in two splits would leak test plots into training."""
    from collections import defaultdict

    from analoglock.data import load_pairs

    pairs = load_pairs("fable_work")
    assert len(pairs) >= 400
    splits = defaultdict(set)
    for p in pairs:
        if p.source != "original":  # untitled originals are distinct stories
            splits[p.source.split(":", 1)[-1].strip().lower()].add(p.split)
    crossing = {s: v for s, v in splits.items() if len(v) > 1}
    assert not crossing, crossing


# --- files that are not text: named with their line, before any model loads -------------------


@pytest.mark.parametrize(
    ("name", "data", "where"),
    [
        (
            "latin1.txt",
            b"First.\n\nSecond, caf\xe9.\n",
            ":3: not UTF-8 text (byte 0xe9 at column 12)",
        ),
        ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: not UTF-8 text (byte 0xe9"),
        (
            "pairs_latin1.jsonl",
            (_pair_line(0) + "\n").encode() + b'{"id": "\xff"}\n',
            ":2: not UTF-8",
        ),
    ],
)
def test_non_utf8_files_name_file_and_line(tmp_path, name, data, where):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DatasetFormatError, match=re.escape(f"{path}{where}")):
        load_documents(str(path))


def test_empty_user_files_are_errors(tmp_path):
    for name, text in (("empty.txt", ""), ("blank.txt", "\n \n\t\n"), ("empty.jsonl", "")):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DatasetFormatError, match=re.escape(f"{path}: no documents")):
            load_documents(str(path))
