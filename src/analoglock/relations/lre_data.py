"""The relation benchmark of Hernandez et al. (ICLR 2024): its JSON format, checks, prompts, tokens.

Owns loading one relation (a shipped one by name, e.g. `country_capital_city` or
`factual/country_capital_city`, or a user's .json file in the same format), the checks that
make a bad file fail with the relation and the sample named, the few-shot prompts the paper
uses (the other samples' "template(subject) object" lines, then the query), and the two tokens
the paper reads: the subject's last token in the prompt and the object's first token.
Knows nothing of activations or operators (see lre.py).

Format (the shipped files; MIT, see data/relations_lre/LICENSE): `name`, `prompt_templates`
(each with one `{}` for the subject), `prompt_templates_zs`, `properties` (`relation_type`,
`domain_name`, `range_name`, `symmetric`) and `samples` (`subject`, `object`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analoglock.data import DatasetFormatError

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "relations_lre"
KINDS = ("factual", "linguistic", "bias")
SLOT = "{}"
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


class RelationDataError(DatasetFormatError):
    """A relation file, sample or split that the benchmark cannot use; the message names which."""


@dataclass(frozen=True)
class RelationSample:
    """One (subject, object) pair of a relation."""

    subject: str
    object: str


@dataclass(frozen=True)
class Relation:
    """One relation: its templates and samples (subjects unique, first occurrence kept)."""

    name: str  # the file's stem, e.g. country_capital_city
    kind: str  # properties.relation_type: factual, linguistic, bias (or the user's own)
    templates: tuple[str, ...]
    samples: tuple[RelationSample, ...]
    templates_zs: tuple[str, ...] = ()
    properties: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    n_duplicates: int = 0  # samples dropped because their subject came earlier

    def template(self, index: int = 0) -> str:
        """The `index`-th few-shot template (the paper uses the first)."""
        if not 0 <= index < len(self.templates):
            raise RelationDataError(
                f"relation {self.name!r} has {len(self.templates)} prompt templates; "
                f"template={index} is out of range"
            )
        return self.templates[index]


def available_relations(kind: str | None = None) -> list[str]:
    """Shipped relations as "kind/name", optionally of one kind."""
    kinds = KINDS if kind is None else (kind,)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown relation kind {kind!r}; shipped kinds: {', '.join(KINDS)}")
    return sorted(f"{k}/{p.stem}" for k in kinds for p in (DATA_DIR / k).glob("*.json"))


def relation_path(name: str | Path) -> Path:
    """A user's .json file, or a shipped relation by "kind/name" or bare name."""
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return path
    if path.suffix == ".json":
        raise FileNotFoundError(f"relation file {path} does not exist")
    stem = str(name).strip()
    hits = [p for p in DATA_DIR.glob("*/*.json") if stem in (p.stem, f"{p.parent.name}/{p.stem}")]
    if len(hits) == 1:
        return hits[0]
    import difflib

    names = available_relations()
    close = difflib.get_close_matches(stem, names + [n.split("/")[1] for n in names], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise FileNotFoundError(
        f"no shipped relation {stem!r} and no such .json file.{hint} Shipped: {', '.join(names)}"
    )


def decode_escapes(text: str) -> str:
    r"""Literal `\uXXXX` sequences (double-escaped in two shipped objects, e.g. Bras\u00edlia)
    become the characters they name."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def check_template(template: Any, relation: str) -> str:
    """A template with exactly one `{}` (the subject's slot), or a RelationDataError."""
    if not isinstance(template, str) or template.count(SLOT) != 1:
        n = template.count(SLOT) if isinstance(template, str) else 0
        raise RelationDataError(
            f"relation {relation!r}: prompt template {template!r} has {n} '{{}}' slots; each "
            "template needs exactly one, where the subject goes (e.g. 'The capital of {} is')"
        )
    return template


def _field(obj: dict, key: str, relation: str, where: str) -> Any:
    """obj[key], or a RelationDataError naming the relation and where the key was missing."""
    if not isinstance(obj, dict) or key not in obj:
        raise RelationDataError(f"relation {relation!r}: {where} has no {key!r} field")
    return obj[key]


def parse_relation(raw: dict, name: str, source: str = "") -> Relation:
    """A checked Relation from the parsed JSON of one file (named `name` in errors)."""
    templates = _field(raw, "prompt_templates", name, "the file")
    if not isinstance(templates, list) or not templates:
        raise RelationDataError(f"relation {name!r}: prompt_templates must be a non-empty list")
    templates = tuple(check_template(t, name) for t in templates)
    zs = tuple(check_template(t, name) for t in raw.get("prompt_templates_zs") or [])
    props = raw.get("properties") or {}
    rows = _field(raw, "samples", name, "the file")
    if not isinstance(rows, list) or not rows:
        raise RelationDataError(f"relation {name!r}: samples must be a non-empty list")
    samples, seen, dups = [], set(), 0
    for i, row in enumerate(rows):
        where = f"sample {i}"
        subject = _field(row, "subject", name, where)
        obj = _field(row, "object", name, where)
        if not isinstance(subject, str) or not subject.strip():
            raise RelationDataError(f"relation {name!r}, {where}: empty subject {subject!r}")
        if not isinstance(obj, str) or not obj.strip():
            raise RelationDataError(
                f"relation {name!r}, {where} (subject {subject!r}): empty object {obj!r}"
            )
        subject, obj = decode_escapes(subject).strip(), decode_escapes(obj).strip()
        if subject in seen:  # the same subject twice (sometimes with another object): ambiguous
            dups += 1
            continue
        seen.add(subject)
        samples.append(RelationSample(subject, obj))
    return Relation(
        name=name,
        kind=str(props.get("relation_type", "user")),
        templates=templates,
        samples=tuple(samples),
        templates_zs=zs,
        properties=dict(props),
        source=source,
        n_duplicates=dups,
    )


def load_relation(name: str | Path) -> Relation:
    """A shipped relation by name or a user's .json file in the benchmark's format, checked."""
    path = relation_path(name)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RelationDataError(f"relation file {path} is not valid JSON: {err}") from err
    return parse_relation(raw, path.stem, str(path))


# ---------------------------------------------------------------- prompts and tokens


def make_prompt(
    template: str, subject: str, examples: Sequence[RelationSample] = ()
) -> tuple[str, int]:
    """(prompt, end of the subject in it): the examples other than `subject` as
    "template(subject) object" lines, then the query (the paper's few-shot format)."""
    lines = [template.replace(SLOT, x.subject) + " " + x.object for x in examples]
    lines = [ln for x, ln in zip(examples, lines, strict=True) if x.subject != subject]
    head = "".join(ln + "\n" for ln in lines)
    return head + template.replace(SLOT, subject), len(head) + template.index(SLOT) + len(subject)


@dataclass(frozen=True)
class PromptIds:
    """Token ids of one prompt as the model reads it (BOS first when it prepends one) and the
    position of the subject's last token."""

    ids: tuple[int, ...]
    subject_index: int

    @property
    def suffix_len(self) -> int:
        """Tokens from the subject's last token to the end (what a subject edit can reach)."""
        return len(self.ids) - self.subject_index


def encode_prompt(
    tokenizer, bos: int | None, prompt: str, subject_end: int, relation: str, subject: str
) -> PromptIds:
    """Ids of `prompt` and the index of the token holding the subject's last character."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    last = subject_end - 1
    hits = [t for t, (a, b) in enumerate(offsets) if a <= last < b]
    if (
        not subject.strip()
        or not hits
        or prompt[subject_end - len(subject) : subject_end] != subject
    ):
        raise RelationDataError(
            f"relation {relation!r}, sample with subject {subject!r}: the subject does not occur "
            f"as tokens of its prompt {prompt[-120:]!r}; check the template and the subject"
        )
    shift = 0 if bos is None else 1
    return PromptIds(tuple(([bos] if bos is not None else []) + ids), hits[-1] + shift)


def object_token(tokenizer, relation: str, sample: RelationSample) -> int:
    """The first token of " object" (the object as it follows the prompt), or a RelationDataError
    when that token is empty or only whitespace (it would not tell objects apart)."""
    ids = tokenizer(" " + sample.object, add_special_tokens=False)["input_ids"]
    if not ids or not tokenizer.decode([ids[0]]).strip():
        shown = [tokenizer.decode([i]) for i in ids[:4]]
        raise RelationDataError(
            f"relation {relation!r}, sample {sample.subject!r} -> {sample.object!r}: the object's "
            f"first token is {shown[:1]!r} (tokens {shown}), which names nothing; the paper "
            "scores the object's first token, so this tokenizer cannot test this sample"
        )
    return int(ids[0])


@dataclass(frozen=True)
class CheckedSamples:
    """The samples a tokenizer can score, their object tokens, and why the others were dropped."""

    samples: tuple[RelationSample, ...]
    object_ids: tuple[int, ...]
    dropped: tuple[str, ...] = ()


def check_samples(
    relation: Relation, tokenizer, bos: int | None, template: str, strict: bool = True
) -> CheckedSamples:
    """Check every sample's subject tokens and object token; raise on the first bad one
    (`strict`) or drop it with its reason."""
    kept, ids, dropped = [], [], []
    for s in relation.samples:
        try:
            prompt, end = make_prompt(template, s.subject)
            encode_prompt(tokenizer, bos, prompt, end, relation.name, s.subject)
            ids.append(object_token(tokenizer, relation.name, s))
            kept.append(s)
        except RelationDataError as err:
            if strict:
                raise
            dropped.append(str(err))
    if dropped:
        log.info("%s: %d samples dropped (%s)", relation.name, len(dropped), dropped[0])
    return CheckedSamples(tuple(kept), tuple(ids), tuple(dropped))
