"""Contrast sets to steer with: read one, refuse a bad one early, harvest it, aggregate vectors.

Owns what a contrast is (`Contrast`: matched positive and negative texts with fixed
train/validation/test splits, and the negative side as steering prompts), read from
  - a shipped concept set's two classes, `set:a-b` (`emotion:angry-calm`: toward angry), or a
    concept-format .jsonl with its classes;
  - a pair dataset, shipped or a pairs-format .jsonl (`fable_work`: toward its second domain, the
    workplace; `fable_work:fable-work` reverses it), prompts being the other side's openings;
  - a user's .jsonl of {"positive": text, "negative": text} rows;
every check that can refuse one before a model loads (one or unknown class, unbalanced classes, an
empty side named by file and line, a split with no rows, a bad layer), harvesting it through
`concepts.harvest_concepts` (each text's last token, or the mean over its tokens, at
`blocks.N.hook_resid_post`), one vector per aggregator and layer from the train rows, and the
held-out probe that scores text for the concept. Knows nothing of steering (`contrast_steer`,
`contrast_arms`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import Tensor

from analoglock.data import ContrastItem, ContrastSet, DatasetFormatError, load_concepts, load_pairs
from analoglock.data.documents import read_utf8_lines
from analoglock.data.loaders import SPLITS, available_datasets
from analoglock.hooks import LayerOutOfRangeError
from analoglock.lock.steering.prompts import story_opening
from analoglock.relations.aggregate import (
    PROBE_L2,
    aggregate,
    check_aggregators,
    contrast_probe,
    probe_scores,
)
from analoglock.relations.concepts import check_pool, harvest_concepts
from analoglock.relations.context import ConceptActs, split_pair_spec
from analoglock.relations.vectors import Probe, balanced_accuracy

READS = ("last", "mean")  # a text's row: its last token, or the mean over its tokens (no BOS)
KINDS = ("concepts", "pairs", "file")
FILE_KEYS = ("positive", "negative", "split", "id")
FILE_ROW = (
    '{"positive": "<text to steer toward>", "negative": "<its matched contrast>"} '
    '(optional "split": train | validation | test, "id": a unique string)'
)
SPLIT_RULE = "row i % 20 in 0..13 -> train, 14..16 -> validation, 17..19 -> test"


class ContrastError(ValueError):
    """A contrast set that cannot be steered with (unknown, one class, unbalanced, empty, ...)."""


@dataclass(frozen=True)
class Contrast:
    """Matched texts of two classes; item i's `pos_texts[i]` and `neg_texts[i]` are one pair.

    Steering pushes toward `positive`; prompts are the negative side (`prompt_texts`: the text
    itself, or a story's opening), so a continuation that reads as positive is the effect.
    """

    spec: str
    kind: str  # "concepts" | "pairs" | "file"
    name: str
    positive: str
    negative: str
    ids: tuple[str, ...]
    splits: tuple[str, ...]
    pos_texts: tuple[str, ...]
    neg_texts: tuple[str, ...]
    prompt_texts: tuple[str, ...]
    path: str | None = None

    def indices(self, *splits: str) -> list[int]:
        """Items in any of `splits`, in file order."""
        return [i for i, s in enumerate(self.splits) if s in splits]

    def counts(self) -> dict[str, int]:
        """Items per split."""
        return {s: len(self.indices(s)) for s in SPLITS}

    def contrast_set(self) -> ContrastSet:
        """The two classes as a text-form `ContrastSet` (no concept span: the whole text is read),
        classes ordered (positive, negative)."""
        items = tuple(
            ContrastItem(i, s, {self.positive: p, self.negative: n}, None)
            for i, s, p, n in zip(
                self.ids, self.splits, self.pos_texts, self.neg_texts, strict=True
            )
        )
        return ContrastSet(self.name, (self.positive, self.negative), items)

    def describe(self) -> dict[str, Any]:
        """Plain JSON: where the texts came from, the direction, and the split sizes."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "name": self.name,
            "path": self.path,
            "positive": self.positive,
            "negative": self.negative,
            "direction": f"{self.positive} - {self.negative}",
            "n_items": len(self.ids),
            "splits": self.counts(),
        }


# ---------------------------------------------------------------- reading


def check_splits(c: Contrast) -> Contrast:
    """Refuse a contrast without train rows to fit on, validation rows to choose a scale on and
    test rows to evaluate once."""
    counts = c.counts()
    if counts["train"] < 2 or counts["validation"] < 1 or counts["test"] < 1:
        raise ContrastError(
            f"contrast {c.spec!r} has {counts['train']} train, {counts['validation']} validation "
            f"and {counts['test']} test items; steering needs >= 2 train items (the vectors), "
            ">= 1 validation item (the scale) and >= 1 test item (the evaluation). Rows without "
            f"a split are assigned by {SPLIT_RULE}, so a file needs at least 18 rows."
        )
    return c


def contrast_from_texts(
    positive: Sequence[str],
    negative: Sequence[str],
    name: str = "texts",
    splits: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    positive_name: str = "positive",
    negative_name: str = "negative",
) -> Contrast:
    """A contrast from two lists of matched texts (positive[i] pairs with negative[i]).

    Unequal lists are refused with their counts: every aggregator but the mean difference reads
    paired differences, and the evaluation prompts are the negative side of held-out pairs.
    Without `splits`, item i gets the shipped sets' rule (i % 20: 0..13 train, 14..16
    validation, 17..19 test).
    """
    positive, negative = [str(t) for t in positive], [str(t) for t in negative]
    if len(positive) != len(negative):
        raise ContrastError(
            f"{name}: unbalanced classes, {len(positive)} {positive_name} vs {len(negative)} "
            f"{negative_name} texts; give one matched {negative_name} text per {positive_name} one."
        )
    for side, texts in ((positive_name, positive), (negative_name, negative)):
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ContrastError(f"{name}: {side} text {empty[0]} is empty.")
    n = len(positive)
    splits = [_split_of(i) for i in range(n)] if splits is None else list(splits)
    ids = [f"{name}/{i:03d}" for i in range(n)] if ids is None else list(ids)
    if len(splits) != n or len(ids) != n:
        raise ContrastError(f"{name}: give one split and one id per pair ({n} pairs).")
    c = Contrast(
        spec=name, kind="file", name=name, positive=positive_name, negative=negative_name,
        ids=tuple(ids), splits=tuple(splits), pos_texts=tuple(positive),
        neg_texts=tuple(negative), prompt_texts=tuple(negative),
    )  # fmt: skip
    return check_splits(c)


def _split_of(i: int) -> str:
    """The shipped datasets' split of row i (FORMAT.md)."""
    k = i % 20
    return "train" if k < 14 else "validation" if k < 17 else "test"


def read_contrast_file(path: str | Path) -> Contrast:
    """A user's .jsonl of {"positive", "negative"} rows, every bad line named with what is valid."""
    path = Path(path)
    rows, seen = [], set()
    for lineno, line in read_utf8_lines(path):
        where = f"{path}:{lineno}"
        if not line.strip():
            raise DatasetFormatError(f"{where}: blank line; each line is one pair {FILE_ROW}")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetFormatError(
                f"{where}: not valid JSON ({err.msg}); expected {FILE_ROW}"
            ) from err
        if not isinstance(obj, dict):
            raise DatasetFormatError(f"{where}: expected a JSON object {FILE_ROW}")
        unknown = sorted(set(obj) - set(FILE_KEYS))
        if unknown:
            raise DatasetFormatError(
                f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; valid fields: "
                f"{', '.join(FILE_KEYS)}. Each line is one pair {FILE_ROW}"
            )
        for side in ("positive", "negative"):
            if side not in obj:
                raise DatasetFormatError(f"{where}: missing {side!r}; each line is {FILE_ROW}")
            if not isinstance(obj[side], str) or not obj[side].strip():
                raise DatasetFormatError(
                    f"{where}: {side!r} is empty or not a string; each side of a pair must be a "
                    f"non-empty text: {FILE_ROW}"
                )
        split = obj.get("split", _split_of(len(rows)))
        if split not in SPLITS:
            raise DatasetFormatError(
                f"{where}: split {split!r} is not one of {', '.join(SPLITS)} (or leave it out: "
                f"{SPLIT_RULE})"
            )
        ident = str(obj.get("id", f"{path.stem}/{len(rows):03d}"))
        if ident in seen:
            raise DatasetFormatError(f"{where}: duplicate id {ident!r}")
        seen.add(ident)
        rows.append((ident, split, obj["positive"], obj["negative"]))
    if not rows:
        raise DatasetFormatError(f"{path}: no rows; each line is one pair {FILE_ROW}")
    ids, splits, pos, neg = (tuple(col) for col in zip(*rows, strict=True))
    c = Contrast(
        spec=str(path), kind="file", name=path.stem, positive="positive", negative="negative",
        ids=ids, splits=splits, pos_texts=pos, neg_texts=neg, prompt_texts=neg, path=str(path),
    )  # fmt: skip
    return check_splits(c)


def _sniff(path: Path) -> str:
    """The format of a user .jsonl from its first non-blank line: file | pairs | concepts."""
    for lineno, line in read_utf8_lines(path):
        if not line.strip():
            continue
        try:
            head = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetFormatError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if isinstance(head, dict) and ("positive" in head or "negative" in head):
            return "file"
        if isinstance(head, dict) and "roles" in head:
            return "pairs"
        if isinstance(head, dict) and ("template" in head or "texts" in head):
            return "concepts"
        raise DatasetFormatError(
            f"{path}:{lineno}: not a contrast file: expected {FILE_ROW}, a pairs line (a, b, "
            "roles) or a concept-set line (template + fills, or texts); see FORMAT.md."
        )
    raise DatasetFormatError(f"{path}: no rows; each line is one pair {FILE_ROW}")


def _from_concepts(spec: str, name: str, a: str | None, b: str | None) -> Contrast:
    """Two classes of a concept set (shipped name or concept-format .jsonl)."""
    cs = load_concepts(name)
    if len(cs.classes) < 2:
        raise ContrastError(
            f"concept set {cs.name!r} has one class ({', '.join(cs.classes) or 'none'}); a "
            "contrast needs two (set:a-b, e.g. emotion:angry-calm)."
        )
    if a is None:
        if len(cs.classes) != 2:
            raise ContrastError(
                f"concept set {cs.name!r} has {len(cs.classes)} classes "
                f"({', '.join(cs.classes)}); pick two as {cs.name}:a-b, toward a "
                f"(e.g. {cs.name}:{cs.classes[0]}-{cs.classes[1]})."
            )
        a, b = cs.classes
    unknown = [c for c in (a, b) if c not in cs.classes]
    if unknown:
        raise ContrastError(
            f"concept set {cs.name!r} has no class {unknown[0]!r}; its classes are "
            f"{', '.join(cs.classes)} (give {cs.name}:a-b, steering toward a)."
        )
    if a == b:
        raise ContrastError(f"contrast {spec!r} sets a class against itself; give two classes.")
    items = cs.items
    c = Contrast(
        spec=spec, kind="concepts", name=cs.name, positive=a, negative=b,
        ids=tuple(it.id for it in items), splits=tuple(it.split for it in items),
        pos_texts=tuple(it.texts[a] for it in items), neg_texts=tuple(it.texts[b] for it in items),
        prompt_texts=tuple(it.texts[b] for it in items),
        path=name if Path(name).suffix == ".jsonl" else None,
    )  # fmt: skip
    return check_splits(c)


def _from_pairs(spec: str, name: str, a: str | None, b: str | None, max_sentences: int) -> Contrast:
    """A pair dataset's two sides; default toward side b (its second domain)."""
    pairs = load_pairs(name)
    stem = Path(name).stem
    domains = stem.split("_", 1) if stem.count("_") == 1 else ["a", "b"]
    sides = {domains[0]: "a", domains[1]: "b", "a": "a", "b": "b"}
    if a is None:
        a, b = domains[1], domains[0]
    unknown = [c for c in (a, b) if c not in sides]
    if unknown:
        raise ContrastError(
            f"pair dataset {stem!r} has sides {domains[0]!r} (a) and {domains[1]!r} (b), not "
            f"{unknown[0]!r}; give {stem}:{domains[1]}-{domains[0]} (toward {domains[1]}) or "
            f"{stem}:{domains[0]}-{domains[1]}."
        )
    if sides[a] == sides[b]:
        raise ContrastError(f"contrast {spec!r} sets a side against itself; give both sides.")

    def text(p, side: str) -> str:
        return p.a if sides[side] == "a" else p.b

    c = Contrast(
        spec=spec, kind="pairs", name=stem, positive=a, negative=b,
        ids=tuple(p.id for p in pairs), splits=tuple(p.split for p in pairs),
        pos_texts=tuple(text(p, a) for p in pairs), neg_texts=tuple(text(p, b) for p in pairs),
        prompt_texts=tuple(story_opening(text(p, b), max_sentences) for p in pairs),
        path=name if Path(name).suffix == ".jsonl" else None,
    )  # fmt: skip
    return check_splits(c)


def _unknown(spec: str) -> ContrastError:
    """The error for a name that is neither a shipped set nor a file."""
    shipped = available_datasets()
    return ContrastError(
        f"contrast={spec!r}: no such concept set, pair dataset or file. Concept sets (give "
        f"set:a-b): {', '.join(shipped['concepts'])}; pair datasets: "
        f"{', '.join(shipped['pairs'])}; or a .jsonl of {FILE_ROW}"
    )


def load_contrast(spec: str, max_sentences: int = 2) -> Contrast:
    """A checked `Contrast` from `set:a-b`, a pair dataset (optionally `name:a-b`) or a .jsonl.

    Every error here comes before a model is loaded. `max_sentences` bounds a story prompt (the
    opening of the negative side, as the lock's steering prompts are).
    """
    spec = str(spec).strip()
    shipped = available_datasets()
    path = Path(spec).expanduser()
    if ":" in spec and not path.exists():
        name, a, b = split_pair_spec(spec, "contrast", "'set:a-b'")
        where = Path(name).expanduser()
        if name in shipped["concepts"]:
            return _from_concepts(spec, name, a, b)
        if name in shipped["pairs"]:
            return _from_pairs(spec, name, a, b, max_sentences)
        if where.suffix == ".jsonl" and where.is_file():
            kind = _sniff(where)
            if kind == "concepts":
                return _from_concepts(spec, str(where), a, b)
            if kind == "pairs":
                return _from_pairs(spec, str(where), a, b, max_sentences)
            raise ContrastError(
                f"contrast={spec!r}: {where} holds positive/negative rows; give the file alone "
                "(it steers toward positive)."
            )
        raise _unknown(spec)
    if spec in shipped["concepts"]:
        return _from_concepts(spec, spec, None, None)
    if spec in shipped["pairs"]:
        return _from_pairs(spec, spec, None, None, max_sentences)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise ContrastError(f"contrast={spec!r}: no such file. A contrast file is {FILE_ROW}")
        kind = _sniff(path)
        if kind == "file":
            return read_contrast_file(path)
        if kind == "pairs":
            return _from_pairs(spec, str(path), None, None, max_sentences)
        return _from_concepts(spec, str(path), None, None)
    raise _unknown(spec)


# ---------------------------------------------------------------- layers and harvesting


def check_read(read: str) -> str:
    """`read` if it names a rule, else an error listing them."""
    if read not in READS:
        raise ContrastError(
            f"read={read!r}: give 'last' (each text's last token) or 'mean' (the mean over its "
            "tokens)."
        )
    return check_pool(read)


def layer_hooks(layers: Sequence[int] | int, n_layers: int | None = None) -> list[str]:
    """`blocks.N.hook_resid_post` for each layer; non-integers, negatives, repeats and (given
    `n_layers`) layers past the model are errors that say the valid range."""
    values = [layers] if isinstance(layers, int) else list(layers)
    if not values:
        raise ContrastError("layers: give at least one layer, e.g. layers=[12].")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) and not str(v).isdigit():
            raise ContrastError(f"layers={values}: {v!r} is not a layer index (0, 1, 2, ...).")
        v = int(v)
        top = f"0..{n_layers - 1}" if n_layers is not None else "0 or more"
        if v < 0:
            raise ContrastError(f"layers={values}: layer {v} is negative; valid layers {top}.")
        if n_layers is not None and v >= n_layers:
            raise LayerOutOfRangeError(
                f"layers={values}: layer {v} is outside the model, which has {n_layers} layers "
                f"(valid layers {top})."
            )
        hook = f"blocks.{v}.hook_resid_post"
        if hook in out:
            raise ContrastError(f"layers={values}: layer {v} is given twice.")
        out.append(hook)
    return out


def harvest_contrast(
    model, contrast: Contrast, hooks: Sequence[str], read: str = "mean", progress: bool = False
) -> ConceptActs:
    """Every item's positive and negative text at `hooks`, one row per text (its last token, or
    the mean over its tokens): a `ConceptActs` with classes (positive, negative)."""
    check_read(read)
    return harvest_concepts(
        model, contrast.contrast_set(), list(hooks), pool=read, max_length=None, progress=progress
    )


# ---------------------------------------------------------------- vectors and the probe


@dataclass
class ContrastVectors:
    """One vector per aggregator and hook (fit on train rows), and each hook's train covariance
    (both classes: what the random control directions are drawn from)."""

    vectors: dict[str, dict[str, Annotated[Tensor, "d_model"]]]
    cov: dict[str, Annotated[Tensor, "d_model d_model"]] = field(repr=False)

    @property
    def hooks(self) -> list[str]:
        """Hooks, in the order given."""
        return list(self.cov)

    def norms(self) -> dict[str, dict[str, float]]:
        """{hook: {aggregator: norm}}."""
        return {h: {a: float(v[h].norm()) for a, v in self.vectors.items()} for h in self.hooks}

    def cosines(self) -> dict[str, dict[str, float]]:
        """{hook: {"a~b": cosine}} between every two aggregators' vectors."""
        names = list(self.vectors)
        out = {}
        for h in self.hooks:
            unit = {a: self.vectors[a][h].double() / self.vectors[a][h].double().norm() for a in names}  # fmt: skip
            out[h] = {
                f"{a}~{b}": float(unit[a] @ unit[b])
                for i, a in enumerate(names)
                for b in names[i + 1 :]
            }
        return out


def contrast_vectors(
    acts: ConceptActs,
    aggregators: Sequence[str],
    hooks: Sequence[str] | None = None,
    probe_l2: float = PROBE_L2,
) -> ContrastVectors:
    """Each aggregator's vector at each hook from the TRAIN rows only (held-out rows never shape a
    vector), classes ordered (positive, negative) as `harvest_contrast` orders them."""
    aggregators = check_aggregators(aggregators)
    pos, neg = acts.classes[:2]
    hooks = list(hooks or acts.hooks)
    vectors: dict[str, dict[str, Tensor]] = {a: {} for a in aggregators}
    cov = {}
    for h in hooks:
        p, n = acts.class_acts(h, pos, "train"), acts.class_acts(h, neg, "train")
        for a in aggregators:
            vectors[a][h] = aggregate(a, p, n, probe_l2)
        cov[h] = torch.cov(torch.cat([p, n]).double().T).float()
    return ContrastVectors(vectors, cov)


def heldout_probe(
    acts: ConceptActs, hook: str, probe_l2: float = PROBE_L2
) -> tuple[Probe, dict[str, Any]]:
    """The probe that scores text for the concept: fit on the train rows at `hook`, with its
    balanced accuracy on the held-out (validation + test) rows, which says whether its scores
    can be read at all (0.5 is chance)."""
    pos, neg = acts.classes[:2]
    probe = contrast_probe(
        acts.class_acts(hook, pos, "train"), acts.class_acts(hook, neg, "train"), probe_l2
    )
    held = acts.split_mask("validation", "test")
    x = torch.cat([acts.class_acts(hook, pos)[held], acts.class_acts(hook, neg)[held]])
    y = torch.cat([torch.ones(int(held.sum())), torch.zeros(int(held.sum()))]).long()
    pred = (probe_scores(probe, x) > 0.5).long()
    info = {
        "hook": hook,
        "l2": float(probe_l2),
        "n_train": int(acts.split_mask("train").sum()),
        "n_heldout": int(held.sum()),
        "heldout_accuracy": balanced_accuracy(pred, y),
        "chance": 0.5,
    }
    return probe, info


__all__ = [
    "READS",
    "Contrast",
    "ContrastError",
    "ContrastVectors",
    "check_read",
    "check_splits",
    "contrast_from_texts",
    "contrast_vectors",
    "harvest_contrast",
    "heldout_probe",
    "layer_hooks",
    "load_contrast",
    "read_contrast_file",
]
