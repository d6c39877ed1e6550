"""Concept activations: harvesting contrast sets and re-running them with an edit.

Owns (1) harvesting a contrast set at its concept positions into a `ConceptActs` (one pooled row
per item and class: the concept word's tokens for template sets, the whole text for text-form sets),
and (2) re-running those documents with an edit at one hook and reading pooled rows at later hooks
(the causal measurements). Concept vectors fit on the rows live in vectors.py.

Pooling: a multi-token concept span becomes one row by its LAST token (default: the position where
the model has read the whole word, as `SpanTokens(which="last")`) or the MEAN of its tokens.
Knows nothing of which analysis uses the rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from torch import Tensor

from analoglock.activation_store import Activations, ActivationStore
from analoglock.activations import harvest, tokenize_documents
from analoglock.data import ContrastSet, Document, concept_documents, load_concepts
from analoglock.hooks import hook_layer, stop_layer, validate_hooks
from analoglock.positions import AllTokens, SpanTokens
from analoglock.relations.context import ConceptActs
from analoglock.tokens import pad_ids

log = logging.getLogger(__name__)

POOLS = ("last", "mean")
HELDOUT = ("validation", "test")  # the fixed splits a probe never trains on
IMBALANCE_RATIO = 1.5  # above this max/min class size ratio we warn and balance


class ConceptPositionError(ValueError):
    """A concept document with no token at the requested concept position."""


@dataclass(frozen=True)
class ConceptTokens:
    """Position rule: the "concept" span's tokens when a document has one, else all real tokens."""

    def select(self, doc: Document, offsets, first_real: int) -> list[tuple[int, int]]:
        """Concept-span tokens (template sets) or every non-BOS token (text-form sets)."""
        if doc.spans:
            return SpanTokens(labels=["concept"]).select(doc, offsets, first_real)
        return AllTokens().select(doc, offsets, first_real)


def check_pool(pool: str) -> str:
    """`pool` if valid, else an error naming the choices."""
    if pool not in POOLS:
        raise ValueError(
            f"pool must be one of {POOLS} (how a multi-token span becomes one row), not {pool!r}"
        )
    return pool


def check_classes(cs: ContrastSet) -> None:
    """Relations need at least two classes with at least one train and one held-out item."""
    if len(cs.classes) < 2:
        raise ValueError(
            f"Concept set {cs.name!r} has one class ({', '.join(cs.classes) or 'none'}); relations "
            "need >= 2 classes to contrast (e.g. male/female, or lion/tiger/bear/animal)."
        )
    splits = {it.split for it in cs.items}
    if "train" not in splits or not splits & set(HELDOUT):
        raise ValueError(
            f"Concept set {cs.name!r} needs train items and held-out ({'/'.join(HELDOUT)}) items; "
            f"it has splits {sorted(splits)} (FORMAT.md: i % 20 in 0..13 train, 14..16 validation, 17..19 test)."
        )


def pool_rows(
    acts: Activations, n_docs: int, pool: str, what: Callable[[list[int]], str] | None = None
) -> dict[str, Annotated[Tensor, "n_docs d_model"]]:
    """One row per document from rows sorted by (doc, pos): the last or the mean of its rows."""
    check_pool(pool)
    counts = torch.bincount(acts.doc, minlength=n_docs)
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        detail = what(missing) if what else f"documents {missing[:5]}"
        raise ConceptPositionError(
            f"{len(missing)} concept document(s) have no token at the concept position: {detail}. "
            "The concept word must occur in the text (template sets: the {x} slot) and within "
            "max_length tokens."
        )
    out = {}
    for hook, x in acts.acts.items():
        if pool == "last":
            out[hook] = x[torch.cumsum(counts, 0) - 1].float()  # rows are sorted by (doc, pos)
        else:
            s = torch.zeros(n_docs, x.shape[1], dtype=torch.float64)
            s.index_add_(0, acts.doc, x.double())
            out[hook] = (s / counts[:, None]).float()
    return out


def _describe_docs(docs: Sequence[Document]) -> Callable[[list[int]], str]:
    """Error detail for missing documents: ids and the start of their text."""
    return lambda idx: "; ".join(f"{docs[i].id} ({docs[i].text[:60]!r})" for i in idx[:5])


def _assemble(
    cs: ContrastSet, docs: Sequence[Document], pooled: dict[str, Tensor], pool: str
) -> ConceptActs:
    """Reshape doc rows (item-major, class-minor, as concept_documents orders them) per class."""
    k = len(cs.classes)
    acts = {
        h: {c: x[j::k].contiguous() for j, c in enumerate(cs.classes)} for h, x in pooled.items()
    }
    words = {
        c: [it.texts[c][slice(*it.spans[c])] if it.spans else None for it in cs.items]
        for c in cs.classes
    }
    texts = {c: [it.texts[c] for it in cs.items] for c in cs.classes}
    return ConceptActs(
        name=cs.name,
        classes=tuple(cs.classes),
        item_ids=[it.id for it in cs.items],
        splits=[it.split for it in cs.items],
        acts=acts,
        words=words,
        texts=texts,
        pool=pool,
        docs=list(docs),
    )


def harvest_concepts(
    model,
    concepts: str | ContrastSet,
    hooks: Sequence[str],
    pool: str = "last",
    max_length: int | None = 128,
    batch_tokens: int = 4096,
    progress: bool = False,
) -> ConceptActs:
    """Harvest a contrast set (shipped name, .jsonl path or loaded set) at its concept positions."""
    cs = load_concepts(concepts) if isinstance(concepts, (str, Path)) else concepts
    check_classes(cs)
    check_pool(pool)
    docs = concept_documents(cs)
    acts = harvest(
        model,
        docs,
        list(hooks),
        ConceptTokens(),
        batch_tokens=batch_tokens,
        max_length=max_length,
        progress=progress,
    )
    pooled = pool_rows(acts, len(docs), pool, _describe_docs(docs))
    return _assemble(cs, docs, pooled, pool)


def check_same_model(model, meta: dict, where: str) -> None:
    """Refuse activations harvested from another model (sha256 differs)."""
    from analoglock.model import model_info

    theirs = (meta or {}).get("sha256")
    ours = model_info(model).sha256
    if theirs and ours and theirs != ours:
        raise ValueError(
            f"{where} was harvested from model {meta.get('spec')!r} (sha256 {theirs[:12]}), "
            f"not the loaded model (sha256 {ours[:12]}); harvest again with this model."
        )


def balance_classes(
    rows: dict[str, list[tuple[str, Tensor]]], gen: torch.Generator, name: str = "concept set"
) -> dict[str, list[tuple[str, Tensor]]]:
    """Equalise class sizes: keep items every class has (matched), else subsample; warn if unequal.

    `rows[cls]` is a list of (item id, row). Matched items keep the paired analyses valid; when
    too few items are shared, each class is randomly subsampled to the smallest class's size.
    """
    if len(rows) < 2:
        raise ValueError(
            f"{name} has one class ({', '.join(rows) or 'none'}); relations need >= 2 classes."
        )
    sizes = {c: len(r) for c, r in rows.items()}
    if min(sizes.values()) == 0:
        raise ValueError(f"{name}: class sizes {sizes}; every class needs rows.")
    if max(sizes.values()) == min(sizes.values()):
        return rows
    level = (
        logging.WARNING
        if max(sizes.values()) > IMBALANCE_RATIO * min(sizes.values())
        else logging.INFO
    )
    shared = set.intersection(*({i for i, _ in r} for r in rows.values()))
    if len(shared) >= 2:
        log.log(
            level,
            "%s: unequal class sizes %s; keeping the %d items every class has",
            name,
            sizes,
            len(shared),
        )
        return {c: [(i, x) for i, x in r if i in shared] for c, r in rows.items()}
    n = min(sizes.values())
    log.log(level, "%s: unequal class sizes %s; subsampling every class to %d rows", name, sizes, n)
    out = {}
    for c, r in rows.items():
        keep = torch.randperm(len(r), generator=gen)[:n].sort().values.tolist()
        out[c] = [r[i] for i in keep]
    return out


def concepts_from_store(
    path: str | Path, pool: str = "last", model=None, seed: int = 0
) -> ConceptActs:
    """A `ConceptActs` from an `analoglock-harvest data.name=<concept set> positions=roles` directory.

    Documents carry meta class/item/split; rows of each document are pooled; unequal classes
    (a `limit=` or `classes=` harvest) are balanced with a warning.
    """
    store = ActivationStore(path)
    if model is not None:
        check_same_model(model, store.meta.get("model", {}), str(path))
    docs = store.docs()
    if not all("class" in d.meta for d in docs):
        raise ValueError(
            f"{path} is not a concept-set harvest: its documents have no meta 'class' "
            "(harvest one with analoglock-harvest data.name=<concept set> positions=roles)."
        )
    acts = store.load()
    pooled = pool_rows(acts, len(docs), pool, _describe_docs(docs))
    split_of = {}
    rows: dict[str, list[tuple[str, int]]] = {}
    for j, d in enumerate(docs):
        item = str(d.meta.get("item", d.id))
        split_of[item] = str(d.meta.get("split", "train"))
        rows.setdefault(str(d.meta["class"]), []).append((item, j))
    gen = torch.Generator().manual_seed(seed)
    name = str(store.meta.get("dataset") or Path(path).name)
    idx_rows = {c: [(i, torch.tensor(j)) for i, j in r] for c, r in rows.items()}
    kept = balance_classes(idx_rows, gen, name)
    classes = tuple(kept)
    matched = len({tuple(i for i, _ in r) for r in kept.values()}) == 1
    first = kept[classes[0]]
    item_ids = [i for i, _ in first] if matched else [f"{name}/row{k}" for k in range(len(first))]
    splits = [split_of.get(i, "train") for i, _ in first]
    out = {
        h: {c: x[torch.stack([j for _, j in kept[c]])] for c in classes} for h, x in pooled.items()
    }
    return ConceptActs(name, classes, item_ids, splits, out, pool=pool)


# ---------------------------------------------------------------- edited forward passes

Edit = Callable[[Tensor, Tensor, Tensor], Tensor]
"""edit(x [batch, pos, d], concept_mask [batch, pos] bool, doc_index [batch]) -> new x."""


def check_read_after_edit(edit_hook: str, read_hooks: Sequence[str]) -> None:
    """An edit can only change hooks at or after its own layer."""
    e = hook_layer(edit_hook)
    for h in read_hooks:
        r = hook_layer(h)
        if e is not None and (r is None or r < e) and not h.startswith(("ln_final", "unembed")):
            raise ValueError(
                f"Incompatible hooks: read hook {h!r} (layer {r}) runs before the edit hook "
                f"{edit_hook!r} (layer {e}), so the edit cannot change it; read at layer >= {e}."
            )


@torch.no_grad()
def forward_concepts(
    model,
    docs: Sequence[Document],
    read_hooks: Sequence[str],
    pool: str = "last",
    edit_hook: str | None = None,
    edit: Edit | None = None,
    max_length: int | None = 128,
    batch_size: int = 32,
) -> dict[str, Annotated[Tensor, "n_docs d_model"]]:
    """Pooled concept rows at `read_hooks`, with `edit` applied at `edit_hook` during the pass.

    Without an edit this equals `harvest_concepts` (tested); with one it is the causal readout.
    """
    read_hooks = validate_hooks(model, read_hooks)
    if (edit is None) != (edit_hook is None):
        raise ValueError("give both edit_hook and edit, or neither")
    if edit_hook is not None:
        validate_hooks(model, [edit_hook])
        check_read_after_edit(edit_hook, read_hooks)
    check_pool(pool)
    toks = tokenize_documents(model, docs, max_length)
    rule = ConceptTokens()
    positions = [
        [p for p, _ in rule.select(d, t.offsets, t.first_real)]
        for d, t in zip(docs, toks, strict=True)
    ]
    missing = [i for i, p in enumerate(positions) if not p]
    if missing:
        raise ConceptPositionError(
            f"{len(missing)} document(s) have no token at the concept position: "
            f"{_describe_docs(docs)(missing)}"
        )
    order = sorted(range(len(docs)), key=lambda i: -len(toks[i].ids))
    hooks_needed = [*read_hooks, *([edit_hook] if edit_hook else [])]
    stop = stop_layer(hooks_needed, model.cfg.n_layers)
    out = {h: torch.zeros(len(docs), model.cfg.d_model) for h in read_hooks}
    device = model.cfg.device
    for s in range(0, len(order), batch_size):
        members = order[s : s + batch_size]
        ids, attn = pad_ids([toks[i].ids for i in members], model.tokenizer.pad_token_id)
        cmask = torch.zeros(ids.shape, dtype=torch.bool)
        for r, i in enumerate(members):
            cmask[r, positions[i]] = True
        doc_idx = torch.tensor(members, device=device)
        captured = _run_edited(
            model, ids, attn, cmask.to(device), doc_idx, read_hooks, stop, edit_hook, edit
        )
        for h in read_hooks:
            x = captured[h].cpu()
            for r, i in enumerate(members):
                rows = x[r, positions[i]]
                out[h][i] = rows[-1] if pool == "last" else rows.mean(0)
    return out


def _run_edited(
    model, ids, attn, cmask, doc_idx, read_hooks, stop, edit_hook, edit
) -> dict[str, Tensor]:
    """One forward pass with the edit attached (if any), capturing the read hooks."""
    captured: dict[str, Tensor] = {}

    def make_capture(name: str) -> Callable:
        def capture(x: Tensor, hook) -> None:
            captured[name] = x.detach().float()

        return capture

    fwd = []
    if edit_hook is not None:
        fwd.append((edit_hook, lambda x, hook: edit(x, cmask, doc_idx)))
    fwd += [(h, make_capture(h)) for h in read_hooks]
    device = model.cfg.device
    with model.hooks(fwd_hooks=fwd):
        model(ids.to(device), attention_mask=attn.to(device), stop_at_layer=stop, return_type=None)
    return captured


def add_at_concept(vectors: Annotated[Tensor, "n_docs d_model"] | Tensor) -> Edit:
    """Edit adding a vector at every concept token (one shared [d] vector, or one per doc [n, d])."""

    def edit(x: Tensor, cmask: Tensor, doc_idx: Tensor) -> Tensor:
        v = vectors.to(x.device, x.dtype)
        v = v[doc_idx] if v.ndim == 2 else v.expand(len(doc_idx), -1)
        return x + cmask[..., None].to(x.dtype) * v[:, None, :]

    return edit
