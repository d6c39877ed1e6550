"""The unit of harvesting: a text with labelled character spans."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DatasetFormatError(ValueError):
    """A dataset line that does not follow FORMAT.md."""


@dataclass(frozen=True)
class Span:
    """A labelled character range [start, end) of a document's text."""

    label: str
    start: int
    end: int


@dataclass(frozen=True)
class Document:
    """A text to run through the model, with spans (roles, concept words) to find positions by."""

    id: str
    text: str
    spans: tuple[Span, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in a harvest's docs.jsonl."""
        return {
            "id": self.id,
            "text": self.text,
            "spans": [[s.label, s.start, s.end] for s in self.spans],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Document:
        """Inverse of `to_dict`."""
        spans = tuple(Span(str(a), int(b), int(c)) for a, b, c in d.get("spans", []))
        return cls(id=d["id"], text=d["text"], spans=spans, meta=d.get("meta", {}))


def read_utf8(path: str | Path) -> str:
    """A text file's content; a file that is not UTF-8 raises `DatasetFormatError` naming the
    file, the line and column of the first bad byte, and the fix (re-save it as UTF-8)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetFormatError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None


def read_utf8_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, without line endings; errors as `read_utf8`."""
    return list(enumerate(read_utf8(path).splitlines(), 1))


def read_text_documents(path: str | Path) -> list[Document]:
    """Documents from a user file: `.jsonl` lines with a "text" field, or a `.txt` of blank-line-separated texts.

    A file with no document (empty, or only blank lines) is an error, as is one that is not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Text file {path} does not exist.")
    docs: list[Document] = []
    if path.suffix == ".jsonl":
        for lineno, line in read_utf8_lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetFormatError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DatasetFormatError(
                    f'{path}:{lineno}: expected an object with a "text" string'
                )
            docs.append(
                Document(id=str(obj.get("id", f"{path.stem}/{len(docs)}")), text=obj["text"])
            )
    else:
        chunks = [c.strip() for c in re.split(r"\n[ \t]*\n", read_utf8(path))]
        docs = [
            Document(id=f"{path.stem}/{i}", text=c) for i, c in enumerate(c for c in chunks if c)
        ]
    if not docs:
        raise DatasetFormatError(
            f"{path}: no documents (the file is empty or holds only blank lines)."
        )
    return docs
