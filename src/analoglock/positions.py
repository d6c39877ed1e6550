"""Position rules: which token positions of a document to harvest.

A rule maps a tokenized document to (token index, span index) pairs; span index is the
document's span the token falls in, or -1. Rules are small dataclasses so Hydra can build them
(`positions=last`, `positions=roles`). They know nothing of models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from analoglock.data.documents import Document

Offsets = list[tuple[int, int]]  # per token: character [start, end) in the text; BOS is (0, 0)


def _overlap(lo: int, hi: int, start: int, end: int) -> bool:
    """Whether token chars [lo, hi) overlap span chars [start, end)."""
    return lo < end and start < hi and hi > lo


def tokens_in_span(offsets: Offsets, start: int, end: int, first_real: int) -> list[int]:
    """Token indices whose characters overlap [start, end)."""
    return [i for i in range(first_real, len(offsets)) if _overlap(*offsets[i], start, end)]


@dataclass(frozen=True)
class AllTokens:
    """Every token; the BOS token only when asked (it is an attention sink, rarely wanted)."""

    include_bos: bool = False

    def select(self, doc: Document, offsets: Offsets, first_real: int) -> list[tuple[int, int]]:
        """All positions, tagged with the span they fall in."""
        start = 0 if self.include_bos else first_real
        tags = _span_tags(doc, offsets, first_real)
        return [(i, tags[i]) for i in range(start, len(offsets))]


@dataclass(frozen=True)
class LastToken:
    """The final token of each document (where a next-token prediction is made)."""

    def select(self, doc: Document, offsets: Offsets, first_real: int) -> list[tuple[int, int]]:
        """The last position."""
        tags = _span_tags(doc, offsets, first_real)
        return [(len(offsets) - 1, tags[-1])]


@dataclass(frozen=True)
class TokenIndices:
    """Given token indices (negative counts from the end; BOS is index 0). Out-of-range ones are skipped."""

    indices: list[int] = field(default_factory=lambda: [-1])

    def select(self, doc: Document, offsets: Offsets, first_real: int) -> list[tuple[int, int]]:
        """The indices that exist in this document, in order, without repeats."""
        n = len(offsets)
        tags = _span_tags(doc, offsets, first_real)
        out: list[int] = []
        for i in self.indices:
            j = i + n if i < 0 else i
            if 0 <= j < n and j not in out:
                out.append(j)
        return [(j, tags[j]) for j in out]


@dataclass(frozen=True)
class SpanTokens:
    """Tokens inside the document's labelled spans (role words, concept words).

    `labels` keeps only spans with those labels; `which` is "all" tokens of a span or only its
    "last" token (where the model has read the whole word).
    """

    labels: list[str] | None = None
    which: str = "all"

    def __post_init__(self) -> None:
        if self.which not in ("all", "last"):
            raise ValueError(f"which must be 'all' or 'last', not {self.which!r}")

    def select(self, doc: Document, offsets: Offsets, first_real: int) -> list[tuple[int, int]]:
        """Positions per kept span, in text order."""
        out: list[tuple[int, int]] = []
        for k, span in enumerate(doc.spans):
            if self.labels is not None and span.label not in self.labels:
                continue
            idx = tokens_in_span(offsets, span.start, span.end, first_real)
            if self.which == "last":
                idx = idx[-1:]
            out += [(i, k) for i in idx]
        return sorted(set(out))


@dataclass(frozen=True)
class MatchString:
    """Tokens overlapping whole-word, case-insensitive occurrences of `text` (span index -1)."""

    text: str
    which: str = "all"

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError("MatchString needs a non-empty text to match")
        if self.which not in ("all", "last"):
            raise ValueError(f"which must be 'all' or 'last', not {self.which!r}")

    def select(self, doc: Document, offsets: Offsets, first_real: int) -> list[tuple[int, int]]:
        """Positions of every occurrence."""
        from analoglock.data.loaders import find_word

        out: list[int] = []
        for lo, hi in find_word(doc.text, self.text):
            idx = tokens_in_span(offsets, lo, hi, first_real)
            out += idx[-1:] if self.which == "last" else idx
        return [(i, -1) for i in sorted(set(out))]


def _span_tags(doc: Document, offsets: Offsets, first_real: int) -> list[int]:
    """Per token, the index of the first span it overlaps, or -1."""
    tags = [-1] * len(offsets)
    for k, span in enumerate(doc.spans):
        for i in tokens_in_span(offsets, span.start, span.end, first_real):
            if tags[i] == -1:
                tags[i] = k
    return tags


RULES = {
    "all": AllTokens,
    "last": LastToken,
    "indices": TokenIndices,
    "spans": SpanTokens,
    "match": MatchString,
}


def position_rule(kind: str, **kwargs):
    """Build a rule by name: all, last, indices, spans, match."""
    if kind not in RULES:
        raise ValueError(f"Unknown position rule {kind!r}; valid: {', '.join(RULES)}")
    return RULES[kind](**kwargs)
