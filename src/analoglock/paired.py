"""Paired activations of two domains: row i of A is the analogue of row i of B.

Owns turning a domain-pair dataset into aligned vectors at one hook, in three views:
- "story": the mean over a story's tokens (fable <-> its workplace retelling);
- "roles": the mean over every token of role k in a story (tortoise <-> junior analyst);
- "mentions": each single mention of role k in story A (the mean over that mention's tokens, in
  its own context) paired with role k's mean in story B. Every mention is a training pair, which
  is what a map applied at role tokens while steering needs.
Harvests are cached on disk keyed by model, dataset and hook. Knows nothing of maps or losses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from analoglock.activation_store import META_FILE, Activations, ActivationStore
from analoglock.activations import harvest_to_disk
from analoglock.data import load_documents, load_pairs
from analoglock.model import cache_root, model_info
from analoglock.positions import AllTokens

log = logging.getLogger(__name__)

VIEWS = ("story", "roles", "mentions")


def view_group(view: str) -> str:
    """The retrieval group of a row's view: "story", "roles" (role<k>) or "mentions" (mention<k>)."""
    if view == "story":
        return "story"
    return "mentions" if view.startswith("mention") else "roles"


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
        """Rows of one split and/or view ("roles" keeps every role<k>, "mentions" every mention<k>)."""
        keep = [
            i
            for i in range(len(self))
            if (split is None or self.split[i] == split)
            and (view is None or self.view[i] == view or view_group(self.view[i]) == view)
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
    """Mean-pool harvested token rows into story-, role- and mention-level A/B pairs."""
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"Unknown views {unknown}; valid: {', '.join(VIEWS)}")
    x = acts.acts[hook].float()
    check_finite(x, f"harvest at {hook}")
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)  # (pair, side, view) -> rows
    mentions: dict[tuple[str, str, int], list[int]] = defaultdict(
        list
    )  # (pair, role, span) -> rows
    for row, (d, s) in enumerate(zip(acts.doc.tolist(), acts.span.tolist(), strict=True)):
        doc = acts.docs[d]
        pair, side = doc.meta["pair"], doc.meta["side"]
        if "story" in views:
            groups[(pair, side, "story")].append(row)
        if s >= 0 and ("roles" in views or "mentions" in views):
            role = doc.spans[s].label
            groups[(pair, side, role)].append(row)
            if side == "a":
                mentions[(pair, role, s)].append(row)
    split_of = {d.meta["pair"]: d.meta["split"] for d in acts.docs}
    rows_a, rows_b, pair_ids, view_ids = [], [], [], []
    for (pair, side, view), rows in sorted(groups.items()):
        if side != "a" or (pair, "b", view) not in groups:
            continue  # a role whose tokens were truncated away on one side has no partner
        if view != "story" and "roles" not in views:
            continue
        rows_a.append(x[rows].mean(0))
        rows_b.append(x[groups[(pair, "b", view)]].mean(0))
        pair_ids.append(pair)
        view_ids.append(view)
    if "mentions" in views:
        for (pair, role, _), rows in sorted(mentions.items()):
            partner = groups.get((pair, "b", role))
            if not partner:
                continue
            rows_a.append(x[rows].mean(0))
            rows_b.append(x[partner].mean(0))
            pair_ids.append(pair)
            view_ids.append("mention" + role.removeprefix("role"))
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


def concat_hooks(parts: Sequence[PairedActivations]) -> PairedActivations:
    """The same pairs read at several hooks at once: each row is its hooks' rows side by side.

    Each hook's block is divided by the root-mean-square norm of its train rows (A and B
    together): residual norms grow with depth, and unscaled the deepest layer would decide every
    cosine and loss. Refuses parts whose rows are not the same pairs in the same order.
    """
    if not parts:
        raise ValueError("concat_hooks needs at least one PairedActivations")
    first = parts[0]
    for k, p in enumerate(parts[1:], start=1):
        if (p.pair, p.view, p.split) != (first.pair, first.view, first.split):
            raise ValueError(
                f"part {k} holds other rows than part 0 ({len(p)} vs {len(first)} rows, or another "
                "order): pool every hook from the same harvest with the same views."
            )
    if "train" not in first.split:
        raise ValueError("concat_hooks scales each hook by its train rows, and there are none")
    blocks_a, blocks_b = [], []
    for p in parts:
        train = p.subset("train")
        rows = torch.cat([train.a, train.b])
        rms = rows.pow(2).sum(-1).mean().sqrt().clamp(min=1e-12)
        blocks_a.append(p.a / rms)
        blocks_b.append(p.b / rms)
    return PairedActivations(
        torch.cat(blocks_a, dim=1),
        torch.cat(blocks_b, dim=1),
        list(first.pair),
        list(first.view),
        list(first.split),
    )


def harvest_dir(model, dataset: str, docs, hooks: Sequence[str]) -> Path:
    """Cache folder for a dataset's all-token harvest at some hooks.

    Named `<dataset>-<content key>-<layers>`: the content key hashes the model and every
    document, so editing a dataset never reuses (or collides with) a stale harvest, and any
    complete harvest of the same content that holds a hook can serve it.
    """
    h = hashlib.sha256(model_info(model).sha256.encode())
    for d in docs:
        h.update(f"\0{d.id}\0{d.text}".encode())
    layers = "+".join(h_.replace("blocks.", "").replace(".hook_", "") for h_ in sorted(hooks))
    return cache_root() / "harvests" / f"{Path(dataset).stem}-{h.hexdigest()[:12]}-{layers}"


def _cached_with(prefix: Path, hooks: Sequence[str]) -> Path | None:
    """A complete cached harvest under `prefix`-* that holds every hook, or None."""
    for meta_path in sorted(prefix.parent.glob(prefix.name + "-*/" + META_FILE)):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("complete") and set(hooks) <= set(meta.get("hooks", [])):
            return meta_path.parent
    return None


def paired_activations(
    model,
    dataset: str = "fable_work",
    hook: str = "blocks.12.hook_resid_post",
    views: tuple[str, ...] | list[str] = VIEWS,
    batch_tokens: int = 4096,
    progress: bool = True,
    also: Sequence[str] = (),
) -> PairedActivations:
    """Harvest (or reuse a cached harvest of) a domain-pair dataset and pool it into pairs.

    `also` names more hooks to harvest in the same pass (a layer sweep pays for one forward);
    `paired_from_cache` then pools them without the model.
    """
    load_pairs(dataset)  # fails early, with the list of datasets, if this is not a pair dataset
    docs = load_documents(dataset, side="both")
    hooks = sorted({hook, *also})
    out = harvest_dir(model, dataset, docs, hooks)
    found = _cached_with(out.with_name(out.name.rsplit("-", 1)[0]), hooks)
    if found is None:
        found = harvest_to_disk(
            model, docs, hooks, out, AllTokens(), dataset=dataset, batch_tokens=batch_tokens,
            progress=progress,
        ).path  # fmt: skip
    return pool_pairs(ActivationStore(found).load(), hook, tuple(views))
