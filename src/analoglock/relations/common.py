"""What several relations analyses fit or harvest the same way: the default SVD basis and the
activations of plain texts.

An analysis given no basis (or one fit at another hook) fits `svd_basis` on the rows it has:
every concept row of the harvested sets, or every non-BOS token of some texts (`text_rows`).
Knows nothing of what the analyses compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated

import torch
from torch import Tensor

from analoglock.activations import harvest
from analoglock.data import Document
from analoglock.positions import AllTokens
from analoglock.relations.context import ConceptActs


def svd_basis(rows: Annotated[Tensor, "n d_model"], n_components: int, hook: str):
    """An `SVDBasis` of up to `n_components` directions fit on `rows` (capped at min(n, d))."""
    from analoglock.bases import SVDBasis

    return SVDBasis(n_components=min(int(n_components), *rows.shape), hook=hook).fit(rows)


def text_rows(model, texts: Sequence[str], hook: str) -> Annotated[Tensor, "n d_model"]:
    """Activations of every non-BOS token of `texts` at `hook` (float32, rows of all texts)."""
    docs = [Document(f"text/{i}", t) for i, t in enumerate(texts)]
    return harvest(model, docs, [hook], AllTokens(), progress=False).acts[hook].float()


def text_basis(model, texts: Sequence[str], hook: str, n_components: int):
    """An SVDBasis fit on every non-BOS token of `texts` at `hook`."""
    return svd_basis(text_rows(model, texts, hook), n_components, hook)


def concept_rows(concepts: Mapping[str, ConceptActs], hook: str) -> Annotated[Tensor, "n d"]:
    """Every concept row of every harvested set at `hook`."""
    return torch.cat([ca.stacked(hook)[0] for ca in concepts.values()])


def basis_at(basis, hook: str, strict: bool = False):
    """`basis` when it was fit at `hook`, else None (the caller then fits its own). A basis that
    names no hook counts as fit there unless `strict` (analyses that read at a hook of their own)."""
    if basis is None:
        return None
    where = getattr(basis, "hook", None if strict else "")
    return basis if where == hook or (not strict and where in ("", None)) else None
