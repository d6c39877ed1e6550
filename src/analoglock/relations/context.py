"""What every relations analysis receives: the model, hooks, harvested concept sets, a basis.

Owns the `RelationsContext` handed to each runner (`runner(cfg_section, ctx) -> dict`), the
`ConceptActs` container of one harvested contrast set, and the one parser of `set:a-b` pair specs.
Knows nothing of how the activations were harvested (see `concepts.py`) or what the analyses
compute.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def split_pair_spec(text: str, what: str, form: str) -> tuple[str, str, str]:
    """`set:a-b` -> (set, a, b), stripped; a ValueError naming the expected form otherwise."""
    try:
        name, rel = str(text).split(":", 1)
        a, b = rel.split("-", 1)
    except ValueError as err:
        raise ValueError(
            f"{what} {text!r} must look like {form}, e.g. 'gender:male-female'"
        ) from err
    return name.strip(), a.strip(), b.strip()


def harvested_only(
    items: Sequence[tuple[str, Sequence[str], T]],
    have: Iterable[str],
    explicit: bool,
    what: str,
) -> tuple[list[T], list[str]]:
    """The items (label, sets they need, item) whose sets were all harvested, and what was left out.

    An item the user asked for (`explicit`) whose set was not harvested is an error; a default one
    is left out and named in the returned list, which the analysis reports beside its results.
    """
    have = set(have)
    kept, skipped = [], []
    for label, sets, item in items:
        missing = sorted({s for s in sets if s not in have})
        if not missing:
            kept.append(item)
            continue
        msg = f"{what} {label}: set {', '.join(map(repr, missing))} not harvested"
        if explicit:
            raise ValueError(
                f"{msg} (have {', '.join(sorted(have)) or 'none'}); add it to concepts= or drop "
                f"this {what} from the config"
            )
        skipped.append(msg)
    return kept, skipped


@dataclass
class ConceptActs:
    """One contrast set harvested at the concept positions, one pooled row per (item, class).

    `acts[hook][cls]` is [n_items, d_model]; row i of every class is the same item (matched
    content), so `acts[h][a] - acts[h][b]` are paired differences. `item_ids` / `splits` are per
    row; `words[cls]` is the concept word of each row (None for text-form sets, whose whole text is
    the concept). `pool` says how multi-token spans became one row ("last" or "mean").
    """

    name: str
    classes: tuple[str, ...]
    item_ids: list[str]
    splits: list[str]
    acts: dict[str, dict[str, Annotated[Tensor, "n_items d_model"]]]
    words: dict[str, list[str | None]] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)
    pool: str = "last"
    docs: list[Any] = field(default_factory=list)  # Documents, item-major then class (for re-runs)

    @property
    def n_items(self) -> int:
        """Items (rows per class)."""
        return len(self.item_ids)

    @property
    def hooks(self) -> list[str]:
        """Hooks harvested."""
        return list(self.acts)

    def split_mask(self, *splits: str) -> Tensor:
        """Boolean row mask of items in any of `splits` ("train", "validation", "test")."""
        return torch.tensor([s in splits for s in self.splits], dtype=torch.bool)

    def class_acts(self, hook: str, cls: str, split: str | None = None) -> Tensor:
        """[n, d_model] rows of one class at one hook, optionally one split only."""
        if hook not in self.acts:
            raise KeyError(f"{self.name}: hook {hook!r} not harvested; have {self.hooks}")
        if cls not in self.acts[hook]:
            raise KeyError(
                f"{self.name}: unknown class {cls!r}; classes: {', '.join(self.classes)}"
            )
        x = self.acts[hook][cls]
        return x if split is None else x[self.split_mask(split)]

    def stacked(self, hook: str, split: str | None = None) -> tuple[Tensor, Tensor]:
        """(X [n_items * n_classes, d], y [n] class indices) at one hook, class-major order."""
        xs = [self.class_acts(hook, c, split) for c in self.classes]
        y = torch.cat([torch.full((len(x),), k, dtype=torch.long) for k, x in enumerate(xs)])
        return torch.cat(xs), y

    def means(self, hook: str, split: str | None = None) -> dict[str, Tensor]:
        """Per-class mean activation [d_model] at one hook."""
        return {c: self.class_acts(hook, c, split).mean(0) for c in self.classes}

    def items_tensor(self, hook: str) -> Annotated[Tensor, "n_items n_classes d_model"]:
        """All rows at one hook as [item, class, d_model] (class order = `classes`)."""
        return torch.stack([self.class_acts(hook, c) for c in self.classes], dim=1)

    def documents(self, *splits: str) -> tuple[list[Any], Tensor, Tensor]:
        """(documents, item index, class index) of the items in `splits` (all when none given)."""
        if not self.docs:
            raise ValueError(f"{self.name}: no documents kept (loaded from a harvest directory?)")
        k = len(self.classes)
        keep = [i for i, s in enumerate(self.splits) if not splits or s in splits]
        idx = [i * k + j for i in keep for j in range(k)]
        items = torch.tensor([i for i in keep for _ in range(k)], dtype=torch.long)
        classes = torch.tensor([j for _ in keep for j in range(k)], dtype=torch.long)
        return [self.docs[t] for t in idx], items, classes


@dataclass
class RelationsContext:
    """Shared state for one `analoglock-relations` run; runners read it, never mutate it.

    `concepts` maps a set name (animals, gender, ...) to its harvest at every hook in `hooks`;
    `basis` is an optional fitted `analoglock.bases.FeatureBasis` (its `.hook` says where it
    lives); `out_dir` is where the run writes relations.json / report.html; `results` holds the
    results of analyses that ran before this one (the CLI fills it), e.g. anomalies reuse
    separability's matrix.
    """

    model: Any
    hooks: list[str]
    concepts: dict[str, ConceptActs]
    basis: Any = None
    seed: int = 0
    out_dir: Path = Path(".")
    results: dict[str, dict] = field(default_factory=dict)  # earlier analyses' results, by name

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh CPU generator seeded from the run seed (offset separates analyses)."""
        return torch.Generator().manual_seed(int(self.seed) + int(offset))

    def concept(self, name: str) -> ConceptActs:
        """One harvested set by name, or a KeyError listing those harvested."""
        if name not in self.concepts:
            raise KeyError(
                f"Concept set {name!r} was not harvested; have {', '.join(self.concepts)}"
            )
        return self.concepts[name]

    def relation(self, spec: str, hook: str) -> Annotated[Tensor, "d_model"]:
        """The relation vector `set:a-b`: mean of class a minus mean of class b at `hook`."""
        name, a, b = split_pair_spec(spec, "Relation", "'set:a-b'")
        means = self.concept(name).means(hook)
        for c in (a, b):
            if c not in means:
                raise ValueError(f"{name} has no class {c!r}; classes: {', '.join(means)}")
        return means[a] - means[b]
