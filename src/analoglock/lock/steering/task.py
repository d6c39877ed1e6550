"""What a steering run is asked to do, and the prompts of one split it is measured on.

Owns the options (`SteerOptions`, refused before any model work) and one split's task
(`SteeringTask`: story openings or user prompts checked to fit the model, their role positions,
the role-transfer items, the neutral prompts, the judge's domain centroids from the reference
split and the candidate analogues), with the chance level of each retrieval measure. Knows
nothing of steering a model, of measuring an arm (`arms`) or of choosing a setting (`evaluate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from analoglock.data.loaders import SPLITS, load_pairs
from analoglock.lock.judge import Judge, centroid
from analoglock.lock.steering.hooks import RowPositions, SteeringError, check_positions
from analoglock.lock.steering.measures import chance_mrr
from analoglock.lock.steering.prompts import (
    NEUTRAL_PROMPTS,
    RoleItem,
    StoryPrompt,
    check_prompt_lengths,
    role_token_positions,
    role_transfer_items,
    story_prompts,
    user_prompts,
)
from analoglock.tokens import encode_texts, prepend_bos_id

# ---------------------------------------------------------------- options


@dataclass
class SteerOptions:
    """How `run_steering` steers and measures (the CLI's config mirrors these fields)."""

    alphas: Sequence[float] = (0.25, 0.5, 1.0)
    """Map strengths tried on validation: x + alpha (M(x) - x); within [0, 1] unless allowed."""
    positions: Sequence[str] = ("roles", "prompt", "new", "all")
    """Positions rules tried for the map on validation (see `steering.hooks`)."""
    scales: Sequence[float] = (1.0, 2.0, 4.0, 8.0)
    """Mean-difference scales tried on validation (x + scale * meandiff)."""
    meandiff_positions: Sequence[str] = ("all",)
    """Positions rules tried for the mean difference on validation."""
    n_random: int = 20
    """Random directions z ~ N(0, cov_a), each at the norm of the lock's mean displacement."""
    random_norm: str = "mean"
    """The random directions' (and meandiff_norm's) norm: "mean", ||alpha * mean(M(x) - x)|| over
    training A rows; or "applied", the lock's measured mean per-token displacement on the test
    prompts (a map moves each token further than its mean displacement)."""
    max_new_tokens: int = 40
    max_sentences: int = 2
    """Story openings are the fable's first sentences (at most this many, never the whole story)."""
    batch_size: int = 16
    seed: int = 0
    select_split: str = "validation"
    eval_split: str = "test"
    ref_split: str = "train"
    """Split whose stories give the judge's domain centroids (never the evaluated one)."""
    max_fluency: float = 1.5
    """Selection constraint: continuation perplexity, steered / unsteered, at most this."""
    min_diversity: float = 0.8
    """Selection constraint: distinct bigrams, steered / unsteered, at least this."""
    n_prompts: int | None = None
    """Use only the first n pairs of each split (None: all)."""
    prompts: Sequence[str] | None = None
    """User prompts evaluated instead of the eval split's openings (no analogue to rank)."""
    hook: str | None = None
    """Hook to steer at (None: the artifact's); a map refuses any hook but its own."""
    allow_extrapolation: bool = False
    truncate: bool = False
    """Cut prompts that do not fit the context or memory budget instead of refusing them."""
    n_boot: int = 2000
    progress: bool = True
    ask: str | None = "auto"
    """The "asked" reference arm on the test openings: no steering, the opening inside an
    instruction to retell it in domain B, in the model's chat template. What the model does when
    simply asked. "auto": the dataset's shipped instruction (`prompts.ASK`) when the model has a
    chat template; a string with "{prompt}": that instruction; None: left out."""

    def check(self) -> None:
        """Refuse bad options before any model work."""
        if not self.alphas or not self.positions or not self.scales:
            raise SteeringError("alphas, positions and scales each need at least one value.")
        for p in (*self.positions, *self.meandiff_positions):
            check_positions(p)
        for name, values in (("alpha", self.alphas), ("scale", self.scales)):
            for v in values:
                if not math.isfinite(float(v)):
                    raise SteeringError(f"{name}={v} is not finite; give finite numbers.")
        if not self.allow_extrapolation:
            bad = [a for a in self.alphas if not 0.0 <= float(a) <= 1.0]
            if bad:
                raise SteeringError(
                    f"alphas {bad} are outside [0, 1]; set allow_extrapolation=true to use them."
                )
        for split in (self.select_split, self.eval_split, self.ref_split):
            if split not in SPLITS:
                raise SteeringError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if self.select_split == self.eval_split:
            raise SteeringError("select_split and eval_split must differ: choose, then evaluate.")
        if self.random_norm not in ("mean", "applied"):
            raise SteeringError(
                f"random_norm must be 'mean' or 'applied', not {self.random_norm!r}"
            )
        if self.ask not in (None, "auto") and "{prompt}" not in str(self.ask):
            raise SteeringError(
                f"ask={self.ask!r} has no '{{prompt}}' where the story opening goes; give an "
                "instruction containing {prompt}, 'auto' (the dataset's own) or null (no asked arm)."
            )
        if self.n_random < 1:
            raise SteeringError(
                "n_random must be >= 1: the lock is read against random directions."
            )


# ---------------------------------------------------------------- what is measured


@dataclass
class SteeringTask:
    """The prompts of one split and everything they are measured against."""

    split: str
    prompts: list[StoryPrompt]
    role_positions: list[tuple[int, ...]]  # per prompt, its role-mention token indices
    items: list[RoleItem]
    item_positions: list[RowPositions]
    neutral: list[str]
    a_centroid: Tensor  # judge centroid of the reference split's fables
    b_centroid: Tensor  # ... and of its workplace stories
    candidates: Tensor  # judge embeddings of this split's workplace stories
    clean_neutral: dict[int, Tensor] = field(default_factory=dict, repr=False)
    measured: dict[tuple, Any] = field(default_factory=dict, repr=False)
    """Arms already measured on these prompts, by what they do (`arms.run_arm`): a task shared
    by several lock runs measures the unsteered model and each vector once."""

    @property
    def chance(self) -> dict[str, float]:
        """What a random ranking scores on each retrieval measure."""
        n = len(self.candidates)
        k = [len(it.candidates) for it in self.items]
        return {
            "analogue_top1": 1.0 / n if n else float("nan"),
            "analogue_mrr": chance_mrr([n]) if n else float("nan"),
            "role_top1": sum(1.0 / c for c in k) / len(k) if k else float("nan"),
            "role_mrr": chance_mrr(k),
        }

    def sizes(self) -> dict[str, int]:
        """How many prompts, role items, neutral prompts and candidate analogues."""
        return {
            "n_prompts": len(self.prompts),
            "n_role_items": len(self.items),
            "n_neutral": len(self.neutral),
            "n_candidates": len(self.candidates),
        }


def build_task(
    model,
    judge: Judge,
    dataset: str,
    split: str,
    opts: SteerOptions,
    prompts: Sequence[str] | None = None,
    neutral: Sequence[str] = NEUTRAL_PROMPTS,
) -> SteeringTask:
    """Openings (or `prompts`), role items and judge references of `dataset`'s `split`, checked
    to fit the model before anything is generated."""
    pairs = load_pairs(dataset, split)
    if opts.n_prompts is not None:
        pairs = pairs[: int(opts.n_prompts)]
    if not pairs:
        raise SteeringError(f"{dataset} has no {split} pairs to steer.")
    refs = load_pairs(dataset, opts.ref_split) or [
        p for p in load_pairs(dataset) if p.split != split
    ]
    if not refs:
        raise SteeringError(f"{dataset} has no pairs outside {split} to use as judge references.")
    if prompts is None:
        story = story_prompts(pairs, opts.max_sentences)
    else:
        roles = list(dict.fromkeys(ra for p in load_pairs(dataset) for ra, _ in p.roles))
        story = user_prompts(prompts, roles)
    texts = check_prompt_lengths(
        model,
        [p.text for p in story],
        [p.id for p in story],
        opts.max_new_tokens,
        opts.batch_size,
        opts.truncate,
    )
    story = [
        StoryPrompt(p.id, t, p.roles, p.analogue, p.index)
        for p, t in zip(story, texts, strict=True)
    ]
    items = role_transfer_items(model, pairs)
    check_prompt_lengths(
        model, [it.prefix for it in items], [f"{it.pair_id}:{it.role_a}" for it in items],
        0, opts.batch_size,
    )  # fmt: skip
    skip = prepend_bos_id(model) is not None
    item_rows = encode_texts(model, [it.prefix for it in items])
    item_positions = [
        RowPositions(len(r), len(r), role_token_positions(model, it.prefix, it.roles), skip)
        for r, it in zip(item_rows, items, strict=True)
    ]
    neutral = check_prompt_lengths(model, list(neutral), None, 0, opts.batch_size)
    return SteeringTask(
        split=split,
        prompts=story,
        role_positions=[role_token_positions(model, p.text, p.roles) for p in story],
        items=items,
        item_positions=item_positions,
        neutral=neutral,
        a_centroid=centroid(judge, [p.a for p in refs]),
        b_centroid=centroid(judge, [p.b for p in refs]),
        candidates=judge.embed([p.b for p in pairs]) if prompts is None else torch.zeros(0, 1),
    )


__all__ = ["SteerOptions", "SteeringTask", "build_task"]
