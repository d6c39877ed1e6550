"""Load and validate the shipped JSONL datasets (format in FORMAT.md).

Domain pairs (`pairs/*.jsonl`) hold analogous stories with aligned roles; concept contrast sets
(`concepts/*.jsonl`) hold matched renderings of one content per class. Every malformed line is
reported with its file and line number.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from analoglock.data.documents import (
    DatasetFormatError,
    Document,
    Span,
    read_text_documents,
    read_utf8_lines,
)

DATA_DIR = Path(__file__).parent
FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
KINDS = ("pairs", "concepts")


@dataclass(frozen=True)
class StoryPair:
    """Two analogous stories (domain A, domain B) with aligned role strings."""

    id: str
    split: str
    source: str
    a: str
    b: str
    roles: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ContrastItem:
    """One content rendered once per class; `spans` marks the concept word when templated."""

    id: str
    split: str
    texts: dict[str, str]
    spans: dict[str, tuple[int, int]] | None


@dataclass(frozen=True)
class ContrastSet:
    """A concept contrast set: matched items over a fixed list of classes."""

    name: str
    classes: tuple[str, ...]
    items: tuple[ContrastItem, ...]


def available_datasets() -> dict[str, list[str]]:
    """Shipped dataset names by kind."""
    return {k: sorted(p.stem for p in (DATA_DIR / k).glob("*.jsonl")) for k in KINDS}


def _dataset_path(name: str, kind: str) -> Path:
    """Path of a shipped dataset by name, or a user's .jsonl file of the same format."""
    path = Path(name)
    if path.suffix == ".jsonl" and path.exists():
        return path
    shipped = DATA_DIR / kind / f"{name}.jsonl"
    if shipped.exists():
        return shipped
    raise FileNotFoundError(
        f"No {kind} dataset named {name!r}. Shipped {kind} datasets: "
        f"{', '.join(available_datasets()[kind])}; or give a path to a .jsonl file in that format."
    )


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every line; blank or non-object lines are errors."""
    rows = []
    for lineno, line in read_utf8_lines(path):
        if not line.strip():
            raise DatasetFormatError(f"{path}:{lineno}: blank line (one JSON object per line)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetFormatError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise DatasetFormatError(f"{path}:{lineno}: expected a JSON object")
        rows.append((lineno, obj))
    if not rows:
        raise DatasetFormatError(f"{path}: empty dataset")
    return rows


def _require(obj: dict, key: str, typ: type, where: str) -> Any:
    """obj[key] if present and of type `typ`, else a located error."""
    if key not in obj:
        raise DatasetFormatError(f"{where}: missing field {key!r}")
    if not isinstance(obj[key], typ):
        raise DatasetFormatError(f"{where}: field {key!r} must be {typ.__name__}")
    return obj[key]


def _check_common(obj: dict, where: str, seen: set[str]) -> tuple[str, str]:
    """Validate id (unique) and split."""
    ident = _require(obj, "id", str, where)
    split = _require(obj, "split", str, where)
    if split not in SPLITS:
        raise DatasetFormatError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    if ident in seen:
        raise DatasetFormatError(f"{where}: duplicate id {ident!r}")
    seen.add(ident)
    return ident, split


def find_word(text: str, phrase: str) -> list[tuple[int, int]]:
    """Character ranges of whole-word, case-insensitive occurrences of `phrase`."""
    pattern = r"(?<!\w)" + re.escape(phrase) + r"(?!\w)"
    return [(m.start(), m.end()) for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def _filter_split(items: list, split: str | None) -> list:
    """Keep items of one split (None keeps all)."""
    if split is None:
        return items
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid: {', '.join(SPLITS)} or None.")
    return [it for it in items if it.split == split]


def _stamp(path: Path) -> tuple[Path, int, int]:
    """Cache key that changes when the file does."""
    st = path.stat()
    return path.resolve(), st.st_mtime_ns, st.st_size


@lru_cache(maxsize=32)
def _load_pairs_file(key: tuple[Path, int, int]) -> tuple[StoryPair, ...]:
    """Parse and validate a pairs file (cached per file state)."""
    path = key[0]
    seen: set[str] = set()
    pairs = []
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        ident, split = _check_common(obj, where, seen)
        a = _require(obj, "a", str, where)
        b = _require(obj, "b", str, where)
        roles = _require(obj, "roles", list, where)
        if not roles:
            raise DatasetFormatError(
                f"{where}: 'roles' is empty; give [role_in_a, role_in_b] pairs"
            )
        clean = []
        for k, role in enumerate(roles):
            if not (
                isinstance(role, list)
                and len(role) == 2
                and all(isinstance(r, str) and r.strip() for r in role)
            ):
                raise DatasetFormatError(
                    f"{where}: roles[{k}] must be [role_in_a, role_in_b], both non-empty"
                )
            for side, phrase, text in (("a", role[0], a), ("b", role[1], b)):
                if not find_word(text, phrase):
                    raise DatasetFormatError(
                        f"{where}: role {phrase!r} (roles[{k}]) does not occur in story {side!r}"
                    )
            clean.append((role[0], role[1]))
        source = obj.get("source", "")
        pairs.append(StoryPair(ident, split, str(source), a, b, tuple(clean)))
    return tuple(pairs)


def load_pairs(name: str, split: str | None = None) -> list[StoryPair]:
    """Analogous story pairs of a shipped domain-pair dataset (or a .jsonl path)."""
    return _filter_split(list(_load_pairs_file(_stamp(_dataset_path(name, "pairs")))), split)


@lru_cache(maxsize=32)
def _load_concepts_file(key: tuple[Path, int, int]) -> ContrastSet:
    """Parse and validate a concept contrast file (cached per file state)."""
    path = key[0]
    seen: set[str] = set()
    classes: tuple[str, ...] | None = None
    items = []
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        ident, split = _check_common(obj, where, seen)
        if "template" in obj:
            template = _require(obj, "template", str, where)
            fills = _require(obj, "fills", dict, where)
            if template.count("{x}") != 1:
                raise DatasetFormatError(f"{where}: template must contain exactly one {{x}} slot")
            start = template.index("{x}")
            texts, spans = {}, {}
            for cls, fill in fills.items():
                if not isinstance(fill, str) or not fill:
                    raise DatasetFormatError(
                        f"{where}: fill for class {cls!r} must be a non-empty string"
                    )
                texts[cls] = template.replace("{x}", fill)
                spans[cls] = (start, start + len(fill))
        else:
            texts = _require(obj, "texts", dict, where)
            spans = None
            for cls, text in texts.items():
                if not isinstance(text, str) or not text:
                    raise DatasetFormatError(
                        f"{where}: text for class {cls!r} must be a non-empty string"
                    )
        keys = tuple(texts)
        if not keys:
            raise DatasetFormatError(f"{where}: no classes (fills/texts is empty)")
        if classes is None:
            classes = keys
        elif set(keys) != set(classes):
            raise DatasetFormatError(
                f"{where}: classes {sorted(keys)} differ from the file's classes {sorted(classes)}"
            )
        items.append(ContrastItem(ident, split, dict(texts), spans))
    return ContrastSet(path.stem, classes or (), tuple(items))


def load_concepts(name: str, split: str | None = None) -> ContrastSet:
    """A concept contrast set (shipped name or .jsonl path), optionally one split."""
    full = _load_concepts_file(_stamp(_dataset_path(name, "concepts")))
    return ContrastSet(full.name, full.classes, tuple(_filter_split(list(full.items), split)))


def pair_documents(pairs: list[StoryPair], side: str = "both", dataset: str = "") -> list[Document]:
    """Documents for one side ("a", "b") or both; every occurrence of role k is a span "role{k}"."""
    if side not in ("a", "b", "both"):
        raise ValueError(f"side must be 'a', 'b' or 'both', not {side!r}")
    sides = ("a", "b") if side == "both" else (side,)
    # Pair datasets are named <domain_a>_<domain_b> (fable_work, vacation_deadline).
    names = (
        dict(zip("ab", dataset.split("_", 1), strict=True))
        if dataset.count("_") == 1
        else {"a": "a", "b": "b"}
    )
    docs = []
    for pair in pairs:
        for s in sides:
            text = pair.a if s == "a" else pair.b
            spans = []
            for k, role in enumerate(pair.roles):
                phrase = role[0] if s == "a" else role[1]
                spans += [Span(f"role{k}", lo, hi) for lo, hi in find_word(text, phrase)]
            meta = {
                "dataset": dataset,
                "pair": pair.id,
                "side": s,
                "domain": names[s],
                "split": pair.split,
            }
            spans.sort(key=lambda sp: sp.start)
            docs.append(Document(f"{pair.id}:{s}", text, tuple(spans), meta))
    return docs


def concept_documents(cs: ContrastSet, classes: list[str] | None = None) -> list[Document]:
    """Documents for the given classes (default all) of a contrast set; the concept word is span "concept"."""
    classes = list(classes or cs.classes)
    unknown = [c for c in classes if c not in cs.classes]
    if unknown:
        raise ValueError(f"Unknown classes {unknown} for {cs.name}; valid: {', '.join(cs.classes)}")
    docs = []
    for item in cs.items:
        for cls in classes:
            spans = (Span("concept", *item.spans[cls]),) if item.spans else ()
            meta = {"dataset": cs.name, "item": item.id, "class": cls, "split": item.split}
            docs.append(Document(f"{item.id}:{cls}", item.texts[cls], spans, meta))
    return docs


def load_documents(
    name: str,
    split: str | None = None,
    side: str = "both",
    classes: list[str] | None = None,
    limit: int | None = None,
) -> list[Document]:
    """Documents from any shipped dataset name or user file (.jsonl pairs/concepts/text, .txt)."""
    shipped = available_datasets()
    path = Path(name)
    if name in shipped["pairs"]:
        docs = pair_documents(load_pairs(name, split), side, dataset=name)
    elif name in shipped["concepts"]:
        docs = concept_documents(load_concepts(name, split), classes)
    elif path.exists():
        docs = _user_documents(path, split, side, classes)
    else:
        listing = "; ".join(f"{k}: {', '.join(v)}" for k, v in shipped.items())
        raise FileNotFoundError(
            f"Unknown dataset {name!r}. Shipped datasets ({listing}); or give a path to a "
            ".jsonl (pairs, concepts or {'text': ...} lines) or .txt file."
        )
    return docs[:limit] if limit is not None else docs


def _user_documents(path: Path, split, side, classes) -> list[Document]:
    """Sniff a user file's format from its first line and load it."""
    if path.suffix == ".jsonl":
        lineno, first = next(((n, line) for n, line in read_utf8_lines(path) if line.strip()), (1, ""))  # fmt: skip
        try:
            head = json.loads(first) if first.strip() else {}
        except json.JSONDecodeError as err:
            raise DatasetFormatError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if "roles" in head:
            return pair_documents(load_pairs(str(path), split), side, dataset=path.stem)
        if "template" in head or "texts" in head:
            return concept_documents(load_concepts(str(path), split), classes)
    return read_text_documents(path)
