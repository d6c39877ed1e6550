"""One steering arm, measured, and the rule that chooses among measured settings.

Owns `run_arm` (generate under one steering, or none, and take every per-unit measure of
`measures` into an `ArmResult`) and the selection rule that the lock's protocol and the contrast
sets' share: `select` (the best row by a ranking key within the fluency and diversity limits;
else the least violating one, flagged) and `fluency_matched`. Knows nothing of which arms a
protocol runs or on which split (`evaluate`, `relations.contrast_steer`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from analoglock.lock.judge import Judge
from analoglock.lock.steering.hooks import Steering, steered_generate, steered_logprobs
from analoglock.lock.steering.measures import (
    continuation_perplexity,
    cosine_ranks,
    distinct_n,
    domain_scores,
    has_loop,
    neutral_kl_values,
    role_transfer_ranks,
)
from analoglock.lock.steering.summary import ArmResult
from analoglock.lock.steering.task import SteeringTask, SteerOptions
from analoglock.tokens import encode_texts

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- one arm


def _measure_key(
    task: SteeringTask, steering: Steering | None, max_new_tokens: int, batch_size: int
) -> tuple | None:
    """What an arm's numbers depend on beyond the task's fixed items, for `task.measured`; None
    for a map (its module is not compared by value), which is always measured."""
    if steering is None:
        what: tuple = ("unsteered",)
    elif steering.kind == "vector":
        v = steering.vector
        what = ("vector", steering.hook, steering.positions, steering.strength, v.numpy().tobytes())
    else:
        return None
    prompts = tuple(p.text for p in task.prompts)
    return (prompts, tuple(map(tuple, task.role_positions)), what, max_new_tokens, batch_size)


@torch.no_grad()
def run_arm(
    model,
    task: SteeringTask,
    steering: Steering | None,
    judge: Judge,
    name: str,
    max_new_tokens: int = 40,
    batch_size: int = 16,
    spec: Mapping[str, Any] | None = None,
) -> ArmResult:
    """Generate under `steering` (None: unsteered) and take every measure, per unit.

    The unsteered model and each vector are measured once per task (greedy decoding and the
    measures are deterministic): asked again, under another name or by another lock run sharing
    the task, the numbers are reused under the new name and spec."""

    def describe() -> dict[str, Any]:  # after generating: a map's applied norm is measured then
        return {**(steering.describe() if steering is not None else {}), **dict(spec or {})}

    key = _measure_key(task, steering, max_new_tokens, batch_size)
    if key is not None and key in task.measured:
        return replace(task.measured[key], name=name, spec=describe())
    gen = steered_generate(
        model,
        [p.text for p in task.prompts],
        steering,
        task.role_positions,
        max_new_tokens,
        batch_size,
    )
    emb = judge.embed(gen.completions)
    if not task.clean_neutral:
        rows = encode_texts(model, task.neutral)
        task.clean_neutral.update(steered_logprobs(model, rows, None, None, batch_size))
    result = ArmResult(
        name=name,
        spec=describe(),  # before the teacher-forced passes, which the map's hook also counts
        texts=gen.completions,
        new_tokens=gen.new_tokens,
        judge_score=domain_scores(emb, task.a_centroid, task.b_centroid),
        analogue_rank=cosine_ranks(emb, task.candidates, [p.index for p in task.prompts]),
        ppl=continuation_perplexity(model, gen.new_tokens, batch_size),
        distinct2=distinct_n(gen.new_tokens),
        loop=has_loop(gen.new_tokens),
        role_rank=role_transfer_ranks(
            model, task.items, steering, batch_size, positions=task.item_positions
        ),
        neutral_kl=neutral_kl_values(model, task.neutral, steering, batch_size, task.clean_neutral),
    )
    if key is not None:
        task.measured[key] = result
    return result


def _feasible(row: Mapping[str, float], opts: SteerOptions) -> bool:
    """Fluency and diversity within the selection constraints (NaN fails)."""
    fl, dv = row.get("fluency_ratio", math.nan), row.get("diversity_ratio", math.nan)
    return fl <= opts.max_fluency and dv >= opts.min_diversity


def _violation(row: Mapping[str, float], opts: SteerOptions) -> float:
    """How far a row is outside the constraints (0 inside; inf when unmeasured)."""
    fl, dv = row.get("fluency_ratio", math.nan), row.get("diversity_ratio", math.nan)
    if math.isnan(fl) or math.isnan(dv):
        return math.inf
    return max(0.0, fl - opts.max_fluency) + max(0.0, opts.min_diversity - dv)


def _key(row: Mapping[str, Any]) -> tuple:
    """Best analogue MRR, then role MRR, then judge shift, then the gentlest intervention."""

    def num(x: Any) -> float:
        return -math.inf if x is None or math.isnan(x) else float(x)

    return (num(row["analogue_mrr"]), num(row["role_mrr"]), num(row["judge_shift"]), -row["norm"])


def select(
    rows: Sequence[Mapping[str, Any]],
    opts: SteerOptions,
    key: Callable[[Mapping[str, Any]], tuple] = _key,
) -> dict[str, Any]:
    """The best row by `key` under the fluency and diversity limits of `opts` (anything with
    `max_fluency` and `min_diversity`); if none meets them, the least violating (flagged)."""
    if not rows:
        raise ValueError("nothing to select from")
    ok = [r for r in rows if _feasible(r, opts)]
    if ok:
        return {**max(ok, key=key), "constraint_met": True}
    least = min(_violation(r, opts) for r in rows)
    near = [r for r in rows if _violation(r, opts) == least]
    log.warning(
        "no setting meets fluency <= %g and diversity >= %g on validation; taking the least "
        "violating one",
        opts.max_fluency,
        opts.min_diversity,
    )
    return {**max(near, key=key), "constraint_met": False}


def fluency_matched(rows: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """The row whose fluency ratio is closest to `target` (in log ratio; ties: the gentlest)."""

    def gap(r: Mapping[str, Any]) -> tuple[float, float]:
        fl = r["fluency_ratio"]
        bad = fl is None or math.isnan(fl) or fl <= 0 or math.isnan(target) or target <= 0
        return (math.inf if bad else abs(math.log(fl / target)), r["norm"])

    return dict(min(rows, key=gap))


__all__ = ["fluency_matched", "run_arm", "select"]
