"""Paired activations of two domains, and the LightningDataModule the lock trainer reads.

Owns turning a domain-pair dataset into aligned vectors at one hook: the whole-story view (mean
over a story's tokens) and the role view (mean over the tokens of role k in each story, so
tortoise <-> junior analyst is one pair). Harvests are cached on disk keyed by model, dataset and
hook. Knows nothing of maps or losses.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from analoglock.activations import Activations, ActivationStore, harvest_to_disk
from analoglock.data import load_documents, load_pairs
from analoglock.model import cache_root, model_info
from analoglock.positions import AllTokens

log = logging.getLogger(__name__)

VIEWS = ("story", "roles")


@dataclass
class PairedActivations:
    """Row i of `a` (domain A) is paired with row i of `b` (domain B)."""

    a: torch.Tensor
    b: torch.Tensor
    pair: list[str]  # pair id, e.g. fable_work/007
    view: list[str]  # "story" or "role<k>"
    split: list[str]

    def __len__(self) -> int:
        return int(self.a.shape[0])

    def subset(self, split: str | None = None, view: str | None = None) -> PairedActivations:
        """Rows of one split and/or view ("roles" keeps every role<k>)."""
        keep = [
            i
            for i in range(len(self))
            if (split is None or self.split[i] == split)
            and (
                view is None
                or self.view[i] == view
                or (view == "roles" and self.view[i].startswith("role"))
            )
        ]
        idx = torch.tensor(keep, dtype=torch.long)
        return PairedActivations(
            self.a[idx],
            self.b[idx],
            [self.pair[i] for i in keep],
            [self.view[i] for i in keep],
            [self.split[i] for i in keep],
        )


def check_finite(x: torch.Tensor, what: str) -> None:
    """Stop with a message naming where NaN/inf appeared."""
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.any(dim=-1).nonzero().flatten()[:5].tolist()
        raise FloatingPointError(f"{what}: NaN/inf activations in rows {rows} (of {x.shape[0]}).")


def pool_pairs(acts: Activations, hook: str, views: tuple[str, ...] = VIEWS) -> PairedActivations:
    """Mean-pool harvested token rows into story-level and role-level A/B pairs."""
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"Unknown views {unknown}; valid: {', '.join(VIEWS)}")
    x = acts.acts[hook].float()
    check_finite(x, f"harvest at {hook}")
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)  # (pair, side, view) -> rows
    for row, (d, s) in enumerate(zip(acts.doc.tolist(), acts.span.tolist(), strict=True)):
        doc = acts.docs[d]
        pair, side = doc.meta["pair"], doc.meta["side"]
        if "story" in views:
            groups[(pair, side, "story")].append(row)
        if "roles" in views and s >= 0:
            groups[(pair, side, doc.spans[s].label)].append(row)
    split_of = {d.meta["pair"]: d.meta["split"] for d in acts.docs}
    rows_a, rows_b, pair_ids, view_ids = [], [], [], []
    for (pair, side, view), rows in sorted(groups.items()):
        if side != "a" or (pair, "b", view) not in groups:
            continue  # a role whose tokens were truncated away on one side has no partner
        rows_a.append(x[rows].mean(0))
        rows_b.append(x[groups[(pair, "b", view)]].mean(0))
        pair_ids.append(pair)
        view_ids.append(view)
    if not rows_a:
        raise ValueError(
            "No A/B pairs found: the harvest needs both sides of a domain-pair dataset."
        )
    return PairedActivations(
        torch.stack(rows_a),
        torch.stack(rows_b),
        pair_ids,
        view_ids,
        [split_of[p] for p in pair_ids],
    )


def harvest_dir(model, dataset: str, hook: str) -> Path:
    """Cache folder for a dataset's all-token harvest at one hook."""
    key = hashlib.sha256(f"{model_info(model).sha256}|{dataset}|{hook}".encode()).hexdigest()[:16]
    return cache_root() / "harvests" / f"{Path(dataset).stem}-{hook}-{key}"


def paired_activations(
    model,
    dataset: str = "fable_work",
    hook: str = "blocks.12.hook_resid_post",
    views: tuple[str, ...] | list[str] = VIEWS,
    batch_tokens: int = 4096,
    progress: bool = True,
) -> PairedActivations:
    """Harvest (or reuse the cached harvest of) a domain-pair dataset and pool it into pairs."""
    load_pairs(dataset)  # fails early, with the list of datasets, if this is not a pair dataset
    docs = load_documents(dataset, side="both")
    out = harvest_dir(model, dataset, hook)
    store = harvest_to_disk(
        model,
        docs,
        [hook],
        out,
        AllTokens(),
        dataset=dataset,
        batch_tokens=batch_tokens,
        progress=progress,
    )
    return pool_pairs(ActivationStore(store.path).load(), hook, tuple(views))
