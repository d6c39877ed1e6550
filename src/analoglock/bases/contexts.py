"""Feature codes over a harvest and the token contexts where features fire.

Owns: batched encoding of harvested rows into codes, activation frequency, the top-activating
contexts of each feature (at most one per document by default, so a list is not ten copies of one
story), and random control contexts. A context's tokens come from re-tokenizing the harvested
document exactly as harvesting did (`activations.tokenize_documents`: BOS + text, no other
special tokens), and every context is checked against the token id the harvest recorded for its
row, so a mismatched tokenizer fails loudly instead of highlighting the wrong word.
Knows nothing of HTML, labels or the model's forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.bases.base import ACTIVE_EPS

Window = tuple[int, int]  # (tokens before, tokens after) the activating token


@dataclass
class Context:
    """One activating example of one feature: a token window around a harvested row."""

    doc: int  # index into acts.docs
    pos: int  # token position in that document (as harvested; BOS is 0 when prepended)
    value: float  # the feature's code there (nan for a control context with no feature)
    tokens: list[str]  # decoded tokens of a window around pos; "".join(tokens) is the text
    highlight: int  # index of the activating token inside `tokens`
    row: int = -1  # row index into the harvest (acts.doc[row] == doc, acts.pos[row] == pos)

    def text(self, mark: str = "<<{}>>") -> str:
        """The window's text with the activating token wrapped by `mark` (a format string)."""
        return "".join(
            mark.format(t) if i == self.highlight else t for i, t in enumerate(self.tokens)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "doc": self.doc,
            "pos": self.pos,
            "value": self.value,
            "tokens": self.tokens,
            "highlight": self.highlight,
            "row": self.row,
        }


# --- codes --------------------------------------------------------------------------------------


@torch.no_grad()
def feature_codes(
    basis,
    acts,
    hook: str | None = None,
    batch_rows: int = 4096,
    progress: bool = False,
) -> Annotated[Tensor, "n_rows n_features"]:
    """Encode every harvested row at the basis's hook (or `hook`) in batches; float32 on CPU."""
    hook = hook or getattr(basis, "hook", "") or None
    if hook is None:
        if len(acts.acts) != 1:
            raise ValueError(
                f"The basis names no hook and the harvest holds {sorted(acts.acts)}; pass hook=."
            )
        hook = next(iter(acts.acts))
    if hook not in acts.acts:
        raise KeyError(
            f"Hook {hook!r} is not in this harvest; it holds {sorted(acts.acts)}. "
            "Harvest that hook or pass one of these as hook=."
        )
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    x = acts.acts[hook]
    device = next((b.device for b in basis.buffers() if b is not None), torch.device("cpu"))
    out = torch.empty(len(x), basis.n_features, dtype=torch.float32)
    starts = range(0, len(x), batch_rows)
    for s in tqdm(starts, desc="encode", unit="batch", disable=not progress):
        chunk = x[s : s + batch_rows].to(device=device, dtype=torch.float32)
        out[s : s + batch_rows] = basis.encode(chunk).float().cpu()
    return out


def feature_frequency(
    codes: Annotated[Tensor, "n_rows n_features"], eps: float = ACTIVE_EPS
) -> Annotated[Tensor, "n_features"]:
    """Fraction of rows where each feature is active (|code| > eps)."""
    if codes.ndim != 2:
        raise ValueError(f"codes must be [n_rows, n_features], got shape {tuple(codes.shape)}")
    if len(codes) == 0:
        return torch.zeros(codes.shape[1])
    return (codes.abs() > eps).float().mean(dim=0)


# --- tokenization, matching the harvest ---------------------------------------------------------


def _split_tokenizer(tokenizer) -> tuple[Any, int | None | str]:
    """(tokenizer, bos) from a model (BOS as the model prepends it) or a bare tokenizer ("auto")."""
    if hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "cfg"):
        from analoglock.tokens import prepend_bos_id

        return tokenizer.tokenizer, prepend_bos_id(tokenizer)
    return tokenizer, "auto"


class _DocTokens:
    """Token ids and text pieces of harvested documents, tokenized on demand as harvesting did."""

    def __init__(self, tokenizer, acts):
        self.tok, self.bos = _split_tokenizer(tokenizer)
        self.acts = acts
        self.cache: dict[int, tuple[list[int], list[str]]] = {}

    def _encode(
        self, docs: Sequence[int], bos: int | None
    ) -> dict[int, tuple[list[int], list[str]]]:
        """Ids and text pieces (concatenating to the text) for each document index."""
        texts = [self.acts.docs[d].text for d in docs]
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = {}
        for d, text, ids, offs in zip(
            docs, texts, enc["input_ids"], enc["offset_mapping"], strict=True
        ):
            out[d] = (
                ([bos] if bos is not None else []) + list(ids),
                ([self.tok.decode([bos])] if bos is not None else []) + _pieces(text, offs),
            )
        return out

    def _resolve_bos(self, rows: Sequence[int]) -> None:
        """Settle "auto" BOS by which choice reproduces the harvested token ids of `rows`."""
        if self.bos != "auto":
            return
        bos_id = self.tok.bos_token_id
        candidates = [bos_id, None] if bos_id is not None else [None]
        sample = list(rows)[:64]
        docs = sorted({int(self.acts.doc[r]) for r in sample})
        for bos in candidates:
            enc = self._encode(docs, bos)
            if all(self._matches(enc, r) for r in sample):
                self.bos = bos
                self.cache.update(enc)
                return
        raise ValueError(
            "Re-tokenizing the harvested documents does not reproduce the harvested token ids "
            "(with or without BOS): this tokenizer is not the one the harvest used. Pass the "
            "model (or its tokenizer) that harvested these activations."
        )

    def _matches(self, enc, r: int) -> bool:
        """Whether the harvest's token id at row r equals the re-tokenized id."""
        ids = enc[int(self.acts.doc[r])][0]
        p = int(self.acts.pos[r])
        return p < len(ids) and ids[p] == int(self.acts.token[r])

    def prepare(self, rows: Iterable[int]) -> None:
        """Tokenize, in one batched call, every document the rows need."""
        rows = list(rows)
        if not rows:
            return
        self._resolve_bos(rows)
        need = sorted({int(self.acts.doc[r]) for r in rows} - set(self.cache))
        if need:
            self.cache.update(self._encode(need, self.bos))  # type: ignore[arg-type]

    def context(self, row: int, value: float, window: Window) -> Context:
        """The window around a harvested row, checked against the harvested token id."""
        d, p = int(self.acts.doc[row]), int(self.acts.pos[row])
        self.prepare([row])
        ids, pieces = self.cache[d]
        if p >= len(ids) or ids[p] != int(self.acts.token[row]):
            got = ids[p] if p < len(ids) else None
            raise ValueError(
                f"Row {row} (doc {d}, pos {p}): the harvest recorded token "
                f"{int(self.acts.token[row])} but re-tokenizing gives {got}; the tokenizer or "
                "the documents differ from the harvest's."
            )
        before, after = window
        lo = max(0, p - before)
        if self.bos is not None and lo == 0 and p > 0:
            lo = 1  # the BOS marker is noise in a context shown to a reader
        hi = min(len(ids), p + after + 1)
        tokens = pieces[lo:hi]
        if tokens[p - lo] == "":  # a token holding part of a multi-byte character
            tokens[p - lo] = self.tok.decode([ids[p]])
        return Context(doc=d, pos=p, value=float(value), tokens=tokens, highlight=p - lo, row=row)


def _pieces(text: str, offsets: Sequence[Sequence[int]]) -> list[str]:
    """Each token's text: from its start to the next token's start, so pieces join to the text.

    Byte-level BPE gives overlapping offsets for the pieces of one multi-byte character; cutting
    at the next start keeps the join exact (such a token may get "" and the next the character).
    """
    starts = [int(o[0]) for o in offsets]
    out = []
    for i, (a, b) in enumerate(offsets):
        end = max(starts[i + 1], int(a)) if i + 1 < len(offsets) else int(b)
        out.append(text[int(a) : end])
    return out


def _check_window(window: Window) -> Window:
    """(before, after) as non-negative ints, or a clear error."""
    if len(window) != 2 or min(int(window[0]), int(window[1])) < 0:
        raise ValueError(f"window must be (tokens_before, tokens_after) >= 0, got {window!r}")
    return int(window[0]), int(window[1])


def _row_mask(n_rows: int, rows) -> Tensor:
    """A bool mask over rows from None, a bool mask, or row indices."""
    mask = torch.zeros(n_rows, dtype=torch.bool)
    if rows is None:
        return mask
    rows = torch.as_tensor(rows)
    if rows.dtype == torch.bool:
        if rows.shape != (n_rows,):
            raise ValueError(f"A row mask must have shape ({n_rows},), got {tuple(rows.shape)}")
        return rows.clone()
    mask[rows.long()] = True
    return mask


# --- contexts -----------------------------------------------------------------------------------


def top_rows(
    values: Annotated[Tensor, "n_rows"],
    doc: Annotated[Tensor, "n_rows"],
    k: int,
    one_per_doc: bool = True,
) -> list[int]:
    """The rows of the k largest finite values, at most one per document when one_per_doc."""
    finite = torch.isfinite(values)
    n = int(finite.sum())
    if n == 0 or k < 1:
        return []
    m = min(n, k if not one_per_doc else 4 * k)
    while True:
        _, idx = torch.topk(torch.where(finite, values, -torch.inf), m)
        rows = [int(r) for r in idx]
        if not one_per_doc:
            return rows[:k]
        chosen, seen = [], set()
        for r in rows:
            d = int(doc[r])
            if d not in seen:
                seen.add(d)
                chosen.append(r)
                if len(chosen) == k:
                    return chosen
        if m == n:
            return chosen
        m = min(n, 4 * m)


def top_contexts(
    codes: Annotated[Tensor, "n_rows n_features"],
    acts,
    tokenizer,
    k: int = 10,
    window: Window = (12, 3),
    features: Iterable[int] | None = None,
    exclude=None,
    one_per_doc: bool = True,
    descending: bool = True,
    progress: bool = False,
) -> dict[int, list[Context]]:
    """Each feature's k highest-code contexts (lowest with descending=False), best first.

    `tokenizer` is the harvesting model (preferred: BOS exactly as harvested) or its tokenizer;
    `exclude` (row indices or a bool row mask) are never chosen, e.g. held-out rows.
    """
    window = _check_window(window)
    if codes.ndim != 2 or len(codes) != len(acts):
        raise ValueError(
            f"codes must be [n_rows={len(acts)}, n_features], got shape {tuple(codes.shape)}"
        )
    feats = list(range(codes.shape[1])) if features is None else [int(f) for f in features]
    bad = [f for f in feats if not 0 <= f < codes.shape[1]]
    if bad:
        raise IndexError(f"features {bad[:5]} out of range: the basis has {codes.shape[1]}")
    blocked = _row_mask(len(codes), exclude)
    chosen: dict[int, list[int]] = {}
    for f in tqdm(feats, desc="top contexts", unit="feature", disable=not progress):
        v = codes[:, f].float() if descending else -codes[:, f].float()
        v = v.masked_fill(blocked, -torch.inf)
        chosen[f] = top_rows(v, acts.doc, k, one_per_doc)
    toks = _DocTokens(tokenizer, acts)
    toks.prepare(r for rows in chosen.values() for r in rows)
    return {
        f: [toks.context(r, float(codes[r, f]), window) for r in rows] for f, rows in chosen.items()
    }


def random_contexts(
    acts,
    tokenizer,
    n: int,
    seed: int,
    window: Window = (12, 3),
    exclude_rows=None,
    values: Annotated[Tensor, "n_rows"] | None = None,
) -> list[Context]:
    """n contexts at uniformly random rows (without replacement) outside `exclude_rows`: controls.

    `values` (one feature's codes over rows) fills Context.value; otherwise it is nan.
    """
    window = _check_window(window)
    allowed = torch.nonzero(~_row_mask(len(acts), exclude_rows)).flatten()
    if n > len(allowed):
        raise ValueError(f"asked for {n} random contexts but only {len(allowed)} rows are allowed")
    gen = torch.Generator().manual_seed(int(seed))
    rows = allowed[torch.randperm(len(allowed), generator=gen)[:n]].tolist()
    toks = _DocTokens(tokenizer, acts)
    toks.prepare(rows)
    return [
        toks.context(r, float(values[r]) if values is not None else float("nan"), window)
        for r in rows
    ]
