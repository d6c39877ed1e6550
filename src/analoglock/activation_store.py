"""Harvested rows in memory (`Activations`) and on disk (`ActivationStore`), read without the model.

Owns the format of a harvest directory: `meta.json` (the commit point: hooks, d_model, dtype,
shards, batches done), `docs.jsonl`, and safetensors shards holding each hook's rows with the
index tensors that say where each row came from (document, position, token, span); and reading
one back, with errors that name what is wrong (a missing, truncated or short shard; an
incomplete harvest, with the command that resumes it). Writing a harvest is `activations`'s;
knows nothing of models, tokenizers or hooks beyond their names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from analoglock.data.documents import Document
from analoglock.model import as_dtype

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
DOCS_FILE = "docs.jsonl"
INDEX_KEYS = ("doc", "pos", "token", "span")


class HarvestError(ValueError):
    """A harvest that cannot run as asked, or a harvest directory that cannot be read."""


class IncompleteHarvestError(HarvestError):
    """A harvest directory whose harvest has not finished (resume it, or allow partial rows)."""


@dataclass
class Activations:
    """Harvested rows: `acts[hook]` is (n_rows, d_model); index tensors say where each row came from."""

    acts: dict[str, torch.Tensor]
    doc: torch.Tensor  # index into `docs`
    pos: torch.Tensor  # token position in the document (BOS is 0)
    token: torch.Tensor  # token id at that position
    span: torch.Tensor  # index into docs[doc].spans, or -1
    docs: list[Document] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.doc.shape[0])

    def rows(self, mask: torch.Tensor) -> Activations:
        """The subset of rows where `mask` (bool or index tensor) selects."""
        return Activations(
            {h: a[mask] for h, a in self.acts.items()},
            self.doc[mask],
            self.pos[mask],
            self.token[mask],
            self.span[mask],
            self.docs,
        )

    def sorted(self) -> Activations:
        """Rows ordered by (document, position)."""
        order = torch.argsort(self.doc * (int(self.pos.max()) + 1 if len(self) else 1) + self.pos)
        return self.rows(order)


def concat_rows(
    parts: list[dict[str, torch.Tensor]], hooks: list[str], d_model: int, dtype
) -> dict[str, torch.Tensor]:
    """Concatenate row dicts (empty-safe)."""
    out = {}
    for key in [*hooks, *INDEX_KEYS]:
        chunks = [p[key] for p in parts]
        if chunks:
            out[key] = torch.cat(chunks)
        else:
            out[key] = (
                torch.empty(0, d_model, dtype=dtype)
                if key in hooks
                else torch.empty(0, dtype=torch.long)
            )
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """A harvest directory's meta.json, with errors that name the directory."""
    path = Path(path)
    meta_path = path / META_FILE
    if path.exists() and not path.is_dir():
        raise HarvestError(f"{path} is a file, not a harvest directory.")
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a harvest directory (no {META_FILE}).")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HarvestError(
            f"{meta_path} is not valid JSON ({err}); the harvest is corrupt."
        ) from err
    if not isinstance(meta, dict):
        raise HarvestError(f"{meta_path} is not a JSON object; the harvest is corrupt.")
    return meta


class ActivationStore:
    """A harvest on disk, readable without the model."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta: dict[str, Any] = read_meta(self.path)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.path}: harvest format {self.meta.get('format_version')} is not {FORMAT_VERSION}."
            )

    @property
    def hooks(self) -> list[str]:
        """Hook names stored."""
        return list(self.meta["hooks"])

    @property
    def complete(self) -> bool:
        """Whether the harvest finished."""
        return bool(self.meta.get("complete"))

    def __len__(self) -> int:
        return int(self.meta["n_rows"])

    def resume_command(self) -> str:
        """The command that finishes this harvest (the CLI records its config in meta.json)."""
        m = self.meta
        cfg = m.get("config") or {}
        hooks = ",".join(m["hooks"])
        parts = ["analoglock-harvest"]
        name = (cfg.get("data") or {}).get("name") or m.get("dataset")
        if name:
            parts.append(f"data.name={name}")
        parts += [f"'hooks=[{hooks}]'", f"out_dir={self.path}"]
        for key in ("max_length", "batch_tokens", "store_dtype"):
            if key in cfg:
                parts.append(f"{key}={cfg[key]}")
        return " ".join(parts) + f" (positions: {m['positions']})"

    def require_complete(self) -> None:
        """Raise `IncompleteHarvestError` naming the missing batches and the resuming command."""
        if self.complete:
            return
        m = self.meta
        done, total = int(m["batches_done"]), m.get("n_batches")
        missing = (
            f"batches {done} to {total - 1} of {total}" if total else f"every batch after {done}"
        )
        raise IncompleteHarvestError(
            f"{self.path} is an incomplete harvest: {len(self)} rows from {done} batches are "
            f"written, {missing} are missing. Finish it by rerunning the same harvest into that "
            f"directory (it resumes after batch {done}): {self.resume_command()}. To use the "
            "partial rows anyway, pass allow_incomplete=true."
        )

    def docs(self) -> list[Document]:
        """The harvested documents, in their original order."""
        with open(self.path / DOCS_FILE, encoding="utf-8") as f:
            return [Document.from_dict(json.loads(line)) for line in f]

    def iter_shards(self, hooks: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Each shard's tensors (selected hooks plus index tensors), one at a time.

        A shard that is missing, truncated, corrupt or shorter than meta.json says raises a
        `HarvestError` naming it."""
        hooks = list(hooks or self.hooks)
        unknown = [h for h in hooks if h not in self.hooks]
        if unknown:
            raise KeyError(f"Hooks {unknown} are not in this harvest; it has {self.hooks}.")
        for shard in self.meta["shards"]:
            path = self.path / shard["file"]
            try:
                with safe_open(str(path), framework="pt") as f:
                    tensors = {k: f.get_tensor(k) for k in [*hooks, *INDEX_KEYS]}
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise HarvestError(
                    f"Shard {path} cannot be read ({type(err).__name__}: {err}): it is missing, "
                    "truncated or corrupt. Delete the harvest directory and harvest again."
                ) from err
            if any(len(t) != shard["rows"] for t in tensors.values()):
                raise HarvestError(
                    f"Shard {path} holds {len(tensors['doc'])} rows but meta.json records "
                    f"{shard['rows']}: the harvest is corrupt. Delete it and harvest again."
                )
            yield tensors

    def load(self, hooks: Sequence[str] | None = None) -> Activations:
        """All rows in memory, ordered by (document, position)."""
        hooks = list(hooks or self.hooks)
        if not self.complete:
            log.warning(
                "%s is an incomplete harvest; loading the %d rows written so far",
                self.path,
                len(self),
            )
        dtype = as_dtype(self.meta["dtype"])
        cat = concat_rows(list(self.iter_shards(hooks)), hooks, self.meta["d_model"], dtype)
        acts = Activations(
            {h: cat[h] for h in hooks}, *(cat[k] for k in INDEX_KEYS), docs=self.docs()
        )
        return acts.sorted()

    def summary(self) -> dict[str, Any]:
        """Counts a person wants to see after a harvest."""
        m = self.meta
        return {
            "out_dir": str(self.path),
            "model": m["model"]["spec"],
            "dataset": m["dataset"],
            "hooks": m["hooks"],
            "positions": m["positions"],
            "n_docs": m["n_docs"],
            "n_rows": m["n_rows"],
            "n_tokens_seen": m["n_tokens_seen"],
            "d_model": m["d_model"],
            "dtype": m["dtype"],
            "shards": len(m["shards"]),
            "complete": m["complete"],
        }
