"""The prompt set an effect is measured on: token ids, where to intervene, where to measure.

A `Prompt` is one document tokenized like `model.to_tokens` (BOS first when the model prepends
one), with two boolean position masks built from `analoglock.positions` rules: `intervene`
(where h1 is edited; default every non-BOS token) and `measure` (where the change of the
downstream code is averaged; default every non-BOS token). Counterfactual patching pairs each
prompt with a source prompt of the same token length. Knows nothing of bases or hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from analoglock.activations import tokenize_documents
from analoglock.data.documents import Document
from analoglock.patching.segment import PatchSetupError
from analoglock.positions import AllTokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One prompt: ids [pos], masks [pos] (bool), and the counterfactual source ids if any."""

    id: str
    ids: Tensor
    intervene: Tensor
    measure: Tensor
    source_ids: Tensor | None = None


def _mask(rule, doc: Document, tok, n: int) -> Tensor:
    """Boolean [n] mask of the positions a rule selects."""
    mask = torch.zeros(n, dtype=torch.bool)
    for pos, _span in rule.select(doc, tok.offsets, tok.first_real):
        mask[pos] = True
    return mask


def build_prompts(
    model,
    docs: Sequence[Document],
    intervene_at=None,
    measure_at=None,
    sources: Sequence[Document] | None = None,
    max_length: int | None = 512,
    drop_mismatched: bool = False,
) -> list[Prompt]:
    """Tokenize docs and mark positions; with `sources`, pair doc k with sources[k] (same length).

    Prompts whose intervene or measure mask is empty are dropped (logged). Source pairs whose
    token lengths differ raise, or are dropped with `drop_mismatched=True`. An empty result raises.
    """
    if not docs:
        raise PatchSetupError("The prompt set is empty: give at least one document.")
    intervene_at = intervene_at or AllTokens()
    measure_at = measure_at or AllTokens()
    toks = tokenize_documents(model, docs, max_length)
    src_toks = None
    if sources is not None:
        if len(sources) != len(docs):
            raise PatchSetupError(
                f"{len(docs)} prompts but {len(sources)} source prompts; counterfactual patching "
                "pairs prompt k with source k."
            )
        src_toks = tokenize_documents(model, sources, max_length)
    prompts: list[Prompt] = []
    dropped: dict[str, int] = {"length": 0, "positions": 0}
    for k, (doc, tok) in enumerate(zip(docs, toks, strict=True)):
        src = None
        if src_toks is not None:
            if len(src_toks[k].ids) != len(tok.ids):
                if not drop_mismatched:
                    raise PatchSetupError(
                        f"Prompt {doc.id!r} has {len(tok.ids)} tokens but its source "
                        f"{sources[k].id!r} has {len(src_toks[k].ids)}; counterfactual pairs "
                        "must align token by token (or pass drop_mismatched=True)."
                    )
                dropped["length"] += 1
                continue
            src = torch.tensor(src_toks[k].ids, dtype=torch.long)
        n = len(tok.ids)
        intervene, measure = _mask(intervene_at, doc, tok, n), _mask(measure_at, doc, tok, n)
        if not intervene.any() or not measure.any():
            dropped["positions"] += 1
            continue
        ids = torch.tensor(tok.ids, dtype=torch.long)
        prompts.append(Prompt(doc.id, ids, intervene, measure, src))
    if any(dropped.values()):
        log.warning(
            "Dropped %d prompts whose source length differs and %d with no selected positions",
            dropped["length"],
            dropped["positions"],
        )
    if not prompts:
        raise PatchSetupError(
            f"No usable prompts among {len(docs)}: {dropped['length']} source pairs differ in "
            f"length, {dropped['positions']} have no positions selected by intervene_at="
            f"{intervene_at!r} / measure_at={measure_at!r}."
        )
    return prompts
