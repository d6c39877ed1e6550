"""Harvest activations at named hooks from a frozen model, in memory or streamed to disk.

Owns tokenization for harvesting (BOS + text, with character offsets), length-bucketed batching
with right padding (causal attention means pads never touch real tokens), capture hooks that keep
only the selected rows, early stopping at the deepest hook needed, and the on-disk format:
`meta.json`, `docs.jsonl`, and safetensors shards, written atomically so a killed harvest resumes.
Knows nothing of feature bases or what the activations are for.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from analoglock.atomic import save_tensors, write_text
from analoglock.data.documents import Document
from analoglock.hooks import stop_layer, validate_hooks
from analoglock.model import as_dtype, model_info
from analoglock.positions import AllTokens
from analoglock.tokens import pad_ids, prepend_bos_id

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
DOCS_FILE = "docs.jsonl"
INDEX_KEYS = ("doc", "pos", "token", "span")


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


@dataclass(frozen=True)
class Tokenized:
    """One document's token ids and per-token character offsets (BOS first when prepended)."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    first_real: int  # index of the first non-BOS token


def tokenize_documents(
    model, docs: Sequence[Document], max_length: int | None = None
) -> list[Tokenized]:
    """Tokenize like `model.to_tokens` (BOS prepended when the model does), keeping offsets."""
    tok = model.tokenizer
    bos = prepend_bos_id(model)
    enc = tok([d.text for d in docs], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    truncated = 0
    for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        ids, offs = list(ids), [tuple(o) for o in offs]
        if bos is not None:
            ids, offs = [bos, *ids], [(0, 0), *offs]
        if max_length is not None and len(ids) > max_length:
            ids, offs = ids[:max_length], offs[:max_length]
            truncated += 1
        out.append(Tokenized(ids, offs, 1 if bos is not None else 0))
    if truncated:
        log.warning("%d of %d documents truncated to %d tokens", truncated, len(docs), max_length)
    return out


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group documents of similar length so each padded batch holds at most `batch_tokens` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # longest first within a batch
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def _run_batch(
    model, ids, mask, hooks: list[str], rows_b, rows_p, stop, store_dtype
) -> dict[str, torch.Tensor]:
    """One forward pass that keeps only the selected (batch, pos) rows of each hook."""
    captured: dict[str, torch.Tensor] = {}

    def make_capture(name: str):
        def capture(x: torch.Tensor, hook) -> None:
            captured[name] = x[rows_b, rows_p].to(store_dtype).clone()

        return capture

    fwd = [(h, make_capture(h)) for h in hooks]
    device = model.cfg.device
    with model.hooks(fwd_hooks=fwd):
        model(ids.to(device), attention_mask=mask.to(device), stop_at_layer=stop, return_type=None)
    missing = [h for h in hooks if h not in captured]
    if missing:
        raise RuntimeError(
            f"Hooks {missing} did not fire; stop_at_layer={stop} may be too shallow."
        )
    return {h: captured[h].cpu() for h in hooks}


def _iter_batches(
    model, docs, hooks, positions, batch_tokens, max_length, store_dtype, start_batch: int = 0
) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """Yield (batch number, n batches, rows, real tokens in the batch); rows hold acts and index tensors."""
    toks = tokenize_documents(model, docs, max_length)
    batches = plan_batches([len(t.ids) for t in toks], batch_tokens)
    stop = stop_layer(hooks, model.cfg.n_layers)
    pad_id = model.tokenizer.pad_token_id
    for b in range(start_batch, len(batches)):
        members = batches[b]
        ids, mask = pad_ids([toks[i].ids for i in members], pad_id)
        sel_b, sel_p, doc_i, span_i = [], [], [], []
        for r, i in enumerate(members):
            for pos, span in positions.select(docs[i], toks[i].offsets, toks[i].first_real):
                sel_b.append(r)
                sel_p.append(pos)
                doc_i.append(i)
                span_i.append(span)
        rows_b = torch.tensor(sel_b, dtype=torch.long)
        rows_p = torch.tensor(sel_p, dtype=torch.long)
        if len(sel_b):
            acts = _run_batch(model, ids, mask, hooks, rows_b, rows_p, stop, store_dtype)
        else:
            acts = {h: torch.empty(0, model.cfg.d_model, dtype=store_dtype) for h in hooks}
        acts["doc"] = torch.tensor(doc_i, dtype=torch.long)
        acts["pos"] = rows_p
        acts["token"] = ids[rows_b, rows_p] if len(sel_b) else torch.empty(0, dtype=torch.long)
        acts["span"] = torch.tensor(span_i, dtype=torch.long)
        yield b, len(batches), acts, int(mask.sum())


def _concat(
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


def harvest(
    model,
    docs: Sequence[Document],
    hooks: Sequence[str],
    positions=None,
    batch_tokens: int = 4096,
    max_length: int | None = 512,
    store_dtype: torch.dtype | str = torch.float32,
    progress: bool = True,
) -> Activations:
    """Harvest activations in memory; rows come back ordered by (document, position)."""
    hooks = validate_hooks(model, hooks)
    positions = positions or AllTokens()
    store_dtype = as_dtype(store_dtype)
    parts = []
    bar = None
    for _, n, rows, _ntok in _iter_batches(
        model, docs, hooks, positions, batch_tokens, max_length, store_dtype
    ):
        if bar is None:
            bar = tqdm(total=n, desc="harvest", unit="batch", disable=not progress)
        parts.append(rows)
        bar.update(1)
    if bar is not None:
        bar.close()
    cat = _concat(parts, hooks, model.cfg.d_model, store_dtype)
    result = Activations({h: cat[h] for h in hooks}, *(cat[k] for k in INDEX_KEYS), docs=list(docs))
    return result.sorted()


def _fingerprint(info: dict, hooks, positions, docs, max_length, dtype) -> str:
    """What must match for a harvest to be resumed into the same directory."""
    h = hashlib.sha256()
    h.update(json.dumps([info["sha256"], hooks, repr(positions), max_length, str(dtype)]).encode())
    for d in docs:
        h.update(d.id.encode())
        h.update(d.text.encode())
    return h.hexdigest()


def harvest_to_disk(
    model,
    docs: Sequence[Document],
    hooks: Sequence[str],
    out_dir: str | Path,
    positions=None,
    dataset: str = "",
    batch_tokens: int = 4096,
    max_length: int | None = 512,
    shard_rows: int = 65536,
    store_dtype: torch.dtype | str = torch.float32,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> ActivationStore:
    """Stream a harvest into safetensors shards under `out_dir`, resuming an interrupted one."""
    hooks = validate_hooks(model, hooks)
    positions = positions or AllTokens()
    store_dtype = as_dtype(store_dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = model_info(model).to_dict()
    fp = _fingerprint(info, hooks, positions, docs, max_length, store_dtype)
    meta_path = out / META_FILE
    meta: dict[str, Any]
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != fp:
            raise FileExistsError(
                f"{out} holds a different harvest (model, hooks, positions or documents differ). "
                "Choose another out_dir or delete it."
            )
        if meta.get("complete"):
            log.info("Harvest in %s is already complete", out)
            return ActivationStore(out)
        log.info("Resuming harvest in %s after batch %d", out, meta["batches_done"])
    else:
        write_text(out / DOCS_FILE, "".join(json.dumps(d.to_dict()) + "\n" for d in docs))
        meta = {
            "format_version": FORMAT_VERSION,
            "model": info,
            "hooks": hooks,
            "d_model": model.cfg.d_model,
            "dtype": str(store_dtype).removeprefix("torch."),
            "dataset": dataset,
            "positions": repr(positions),
            "max_length": max_length,
            "n_docs": len(docs),
            "n_rows": 0,
            "n_tokens_seen": 0,
            "shards": [],
            "batches_done": 0,
            "complete": False,
            "fingerprint": fp,
            **(extra_meta or {}),
        }
        write_text(meta_path, json.dumps(meta, indent=1))

    buffer: list[dict[str, torch.Tensor]] = []
    buffered_rows = 0
    buffered_tokens = 0
    bar = None

    def flush(batches_done: int) -> None:
        nonlocal buffer, buffered_rows, buffered_tokens
        if buffered_rows:
            name = f"shard_{len(meta['shards']):05d}.safetensors"
            save_tensors(out / name, _concat(buffer, hooks, model.cfg.d_model, store_dtype))
            meta["shards"].append({"file": name, "rows": buffered_rows})
        meta["n_rows"] += buffered_rows
        meta["n_tokens_seen"] += buffered_tokens
        meta["batches_done"] = batches_done
        write_text(meta_path, json.dumps(meta, indent=1))  # the commit point
        buffer, buffered_rows, buffered_tokens = [], 0, 0

    stream = _iter_batches(
        model, docs, hooks, positions, batch_tokens, max_length, store_dtype, meta["batches_done"]
    )
    n_batches = meta["batches_done"]
    for b, n, rows, ntok in stream:
        if bar is None:
            bar = tqdm(
                total=n,
                initial=b,
                desc=f"harvest -> {out.name}",
                unit="batch",
                disable=not progress,
            )
        n_batches = n
        buffer.append(rows)
        buffered_rows += len(rows["doc"])
        buffered_tokens += ntok
        bar.update(1)
        if buffered_rows >= shard_rows:
            flush(b + 1)
    if bar is not None:
        bar.close()
    flush(n_batches)
    meta["complete"] = True
    write_text(meta_path, json.dumps(meta, indent=1))
    return ActivationStore(out)


class ActivationStore:
    """A harvest on disk, readable without the model."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.path} is not a harvest directory (no {META_FILE}).")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
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

    def docs(self) -> list[Document]:
        """The harvested documents, in their original order."""
        with open(self.path / DOCS_FILE, encoding="utf-8") as f:
            return [Document.from_dict(json.loads(line)) for line in f]

    def iter_shards(self, hooks: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Each shard's tensors (selected hooks plus index tensors), one at a time."""
        hooks = list(hooks or self.hooks)
        unknown = [h for h in hooks if h not in self.hooks]
        if unknown:
            raise KeyError(f"Hooks {unknown} are not in this harvest; it has {self.hooks}.")
        for shard in self.meta["shards"]:
            with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                yield {k: f.get_tensor(k) for k in [*hooks, *INDEX_KEYS]}

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
        cat = _concat(list(self.iter_shards(hooks)), hooks, self.meta["d_model"], dtype)
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
