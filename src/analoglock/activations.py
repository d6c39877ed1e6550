"""Harvest activations at named hooks from a frozen model, in memory or streamed to disk.

Owns tokenization for harvesting (BOS + text, with character offsets), length-bucketed batching
with right padding (causal attention means pads never touch real tokens), capture hooks that keep
only the selected rows, early stopping at the deepest hook needed, and writing a harvest
directory (the format is `activation_store`'s) atomically, so a killed harvest resumes.
Knows nothing of feature bases or what the activations are for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from analoglock.activation_store import (
    DOCS_FILE,
    FORMAT_VERSION,
    INDEX_KEYS,
    META_FILE,
    Activations,
    ActivationStore,
    HarvestError,
    concat_rows,
    read_meta,
)
from analoglock.atomic import check_out_dir, save_tensors, write_text
from analoglock.data.documents import Document
from analoglock.hooks import stop_layer, validate_hooks
from analoglock.model import as_dtype, model_info
from analoglock.positions import AllTokens
from analoglock.tokens import check_lengths, pad_ids, prepend_bos_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tokenized:
    """One document's token ids and per-token character offsets (BOS first when prepended)."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    first_real: int  # index of the first non-BOS token


def tokenize_documents(
    model,
    docs: Sequence[Document],
    max_length: int | None = None,
    batch_tokens: int | None = None,
    logits: bool = True,
) -> list[Tokenized]:
    """Tokenize like `model.to_tokens` (BOS prepended when the model does), keeping offsets.

    `max_length` truncates (the only truncation: asked for, and logged). What is left must fit
    the model's context and the memory of a forward (`tokens.check_lengths`; batches of
    `batch_tokens` tokens, `logits=False` when the forward stops before the unembedding), or a
    `ContextLengthError` names the documents before any forward runs.
    """
    tok = model.tokenizer
    bos = prepend_bos_id(model)
    texts = [d.text for d in docs]
    enc = (
        tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        if texts
        else {"input_ids": [], "offset_mapping": []}
    )
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
    check_lengths(
        model,
        [len(t.ids) for t in out],
        [d.id for d in docs],
        batch_tokens=batch_tokens,
        logits=logits,
        what="document",
        fix="set max_length=N to truncate every document to N tokens",
    )
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


@dataclass(frozen=True)
class HarvestPlan:
    """Tokens, selected (position, span) pairs per document, and the batches, before any forward."""

    toks: list[Tokenized]
    selected: list[list[tuple[int, int]]]
    batches: list[list[int]]

    @property
    def n_rows(self) -> int:
        return sum(len(s) for s in self.selected)


def plan_harvest(
    model, docs: Sequence[Document], positions, batch_tokens: int, max_length: int | None
) -> HarvestPlan:
    """Tokenize, select positions and batch; refuse an empty document list or zero selected rows."""
    if not docs:
        raise HarvestError("No documents to harvest: the dataset or file gave none.")
    toks = tokenize_documents(model, docs, max_length, batch_tokens=batch_tokens, logits=False)
    selected = [
        positions.select(doc, t.offsets, t.first_real) for doc, t in zip(docs, toks, strict=True)
    ]
    plan = HarvestPlan(toks, selected, plan_batches([len(t.ids) for t in toks], batch_tokens))
    if plan.n_rows == 0:
        lengths = sorted(len(t.ids) for t in toks)
        shown = (
            ", ".join(map(str, lengths))
            if len(lengths) <= 12
            else f"{lengths[0]} to {lengths[-1]} (median {lengths[len(lengths) // 2]})"
        )
        bos = "index 0 is the BOS token; " if toks[0].first_real else ""
        raise HarvestError(
            f"The positions rule {positions!r} selects no token in any of the {len(docs)} "
            f"documents, whose token lengths are {shown} ({bos}negative indices count from the "
            "end). Choose positions that exist in these documents."
        )
    return plan


def _iter_batches(
    model, docs, hooks, plan: HarvestPlan, store_dtype, start_batch: int = 0
) -> Iterator[tuple[int, int, dict[str, torch.Tensor], int]]:
    """Yield (batch number, n batches, rows, real tokens in the batch); rows hold acts and index tensors."""
    toks, batches = plan.toks, plan.batches
    stop = stop_layer(hooks, model.cfg.n_layers)
    pad_id = model.tokenizer.pad_token_id
    for b in range(start_batch, len(batches)):
        members = batches[b]
        ids, mask = pad_ids([toks[i].ids for i in members], pad_id)
        sel_b, sel_p, doc_i, span_i = [], [], [], []
        for r, i in enumerate(members):
            for pos, span in plan.selected[i]:
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
    plan = plan_harvest(model, docs, positions, batch_tokens, max_length)
    parts = []
    bar = None
    for _, n, rows, _ntok in _iter_batches(model, docs, hooks, plan, store_dtype):
        if bar is None:
            bar = tqdm(total=n, desc="harvest", unit="batch", disable=not progress)
        parts.append(rows)
        bar.update(1)
    if bar is not None:
        bar.close()
    cat = concat_rows(parts, hooks, model.cfg.d_model, store_dtype)
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
    """Stream a harvest into safetensors shards under `out_dir`, resuming an interrupted one.

    Everything the inputs alone decide (hooks, out_dir, documents, lengths, selected rows) is
    checked before `out_dir` is created; a harvest that fails before its first committed batch
    removes the directory it created, so a failed start leaves nothing behind.
    """
    hooks = validate_hooks(model, hooks)
    positions = positions or AllTokens()
    store_dtype = as_dtype(store_dtype)
    out = check_out_dir(out_dir)
    info = model_info(model).to_dict()
    fp = _fingerprint(info, hooks, positions, docs, max_length, store_dtype)
    meta_path = out / META_FILE
    meta: dict[str, Any] | None = None
    if meta_path.exists():
        meta = read_meta(out)
        if meta.get("fingerprint") != fp:
            raise FileExistsError(
                f"{out} holds a different harvest (model, hooks, positions or documents differ). "
                "Choose another out_dir or delete it."
            )
        if meta.get("complete"):
            log.info("Harvest in %s is already complete", out)
            return ActivationStore(out)
        # a resumed harvest must replay the batches it was started with
        batch_tokens = int(meta.get("batch_tokens", batch_tokens))
        log.info("Resuming harvest in %s after batch %d", out, meta["batches_done"])
    plan = plan_harvest(model, docs, positions, batch_tokens, max_length)
    created = not out.exists()
    try:
        return _write_harvest(
            model, docs, hooks, out, plan, meta, fp, info, positions, dataset, batch_tokens,
            max_length, shard_rows, store_dtype, progress, extra_meta,
        )  # fmt: skip
    except BaseException:
        if created and not _batches_done(out):
            shutil.rmtree(out, ignore_errors=True)  # nothing to resume: leave nothing behind
        raise


def _batches_done(out: Path) -> int:
    """Batches committed in a harvest directory (0 when there is no readable meta.json)."""
    try:
        return int(json.loads((out / META_FILE).read_text()).get("batches_done", 0))
    except (OSError, ValueError):
        return 0


def _write_harvest(
    model, docs, hooks, out: Path, plan: HarvestPlan, meta, fp, info, positions, dataset,
    batch_tokens, max_length, shard_rows, store_dtype, progress, extra_meta,
) -> ActivationStore:  # fmt: skip
    """The streaming loop of `harvest_to_disk`: new meta.json or the resumed one, shards, commits."""
    meta_path = out / META_FILE
    if meta is None:
        out.mkdir(parents=True, exist_ok=True)
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
            "batch_tokens": batch_tokens,
            "n_docs": len(docs),
            "n_rows": 0,
            "n_tokens_seen": 0,
            "shards": [],
            "batches_done": 0,
            "n_batches": len(plan.batches),
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
            save_tensors(out / name, concat_rows(buffer, hooks, model.cfg.d_model, store_dtype))
            meta["shards"].append({"file": name, "rows": buffered_rows})
        meta["n_rows"] += buffered_rows
        meta["n_tokens_seen"] += buffered_tokens
        meta["batches_done"] = batches_done
        write_text(meta_path, json.dumps(meta, indent=1))  # the commit point
        buffer, buffered_rows, buffered_tokens = [], 0, 0

    stream = _iter_batches(model, docs, hooks, plan, store_dtype, meta["batches_done"])
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
    meta["n_batches"] = n_batches
    meta["complete"] = True
    write_text(meta_path, json.dumps(meta, indent=1))
    return ActivationStore(out)
