"""One contrast-steering arm, measured, and the statistics over arms.

Owns the measures (`MEASURES`), one steering of several layers at once (`layered`), what
a continuation is scored with (`Readout`) and on which prompts (`Task`), one arm's per-prompt
values (`run_arm` -> `ArmValues`), and their summaries: point values, bootstrap intervals over
prompts, paired differences against the mean difference, empirical p-values against random
directions. Hooks, generation, fluency, diversity, loops and neutral KL are the lock's
(`lock.steering`); knows nothing of which arms are run or how one is chosen (`contrast_steer`),
of the CLI or of plotting.

The concept effect: a logistic probe fit on the contrast's train rows at the probe hook scores a
continuation as P(positive); the effect is the mean over prompts of the steered continuation's
score minus the unsteered one's. The probe reads the continuation's TEXT, run through the
unsteered model alone (BOS + continuation, pooled as the rows were: last token or mean), not the
steered forward pass. At the steered hook the probe would read the injected vector itself
(w . scale v): any direction with a positive projection on the probe's weights would "work"
without changing a word, the probe aggregator would win by construction, and the random controls
would be scored on the same circular terms. Read from the written text, the question is whether
the model wrote something that reads as positive, which is what steering is for. The probe's
held-out accuracy on the contrast's own validation and test rows is reported beside it. Pair
datasets also get the sentence judge's domain shift (toward the positive side's centroid).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from analoglock.data import Document
from analoglock.lock.steering.hooks import (
    Steering,
    combined_steering,
    steered_generate,
    steered_logprobs,
    vector_steering,
)
from analoglock.lock.steering.measures import (
    continuation_perplexity,
    distinct_n,
    domain_scores,
    has_loop,
    neutral_kl_values,
)
from analoglock.lock.steering.summary import jsonable
from analoglock.relations.aggregate import probe_scores
from analoglock.relations.concepts import forward_concepts
from analoglock.relations.vectors import Probe
from analoglock.stats import bootstrap_mean, empirical_p
from analoglock.tokens import encode_texts

REFERENCE = "meandiff"  # the paired comparisons hold every aggregator against the mean difference


@dataclass(frozen=True)
class Measure:
    """A per-prompt (or per neutral prompt) statistic; `log`: a ratio steered / unsteered,
    summarised as the geometric mean over prompts (the mean of per-prompt log ratios)."""

    unit: str  # "prompt" | "neutral"
    higher_is_better: bool
    log: bool = False


MEASURES: dict[str, Measure] = {
    "concept_shift": Measure("prompt", True),  # probe P(positive) steered - unsteered
    "concept_score": Measure("prompt", True),  # probe P(positive) of the continuation
    "judge_shift": Measure("prompt", True),  # pair datasets: judge score steered - unsteered
    "fluency_ratio": Measure("prompt", False, log=True),  # continuation perplexity ratio
    "diversity_ratio": Measure("prompt", True, log=True),  # distinct-2 ratio
    "loop_rate": Measure("prompt", False),  # a 4-gram repeated >= 3 times
    "neutral_kl": Measure("neutral", False),  # KL(unsteered || steered) on neutral prompts
}


# ---------------------------------------------------------------- one steering, several layers


def layered(model, vectors: Mapping[str, Tensor], scale: float, positions: str = "all") -> Steering:
    """`x + scale v_h` at every hook h of `vectors` at once, on the same positions, as a
    multi-layer control vector acts (each checked as `vector_steering` checks)."""
    parts = [vector_steering(model, h, v, scale, positions) for h, v in vectors.items()]
    return combined_steering(*parts)


# ---------------------------------------------------------------- measuring one arm


@dataclass
class Readout:
    """What a continuation is scored with: the probe at its hook, and for stories the judge."""

    probe: Probe
    hook: str
    read: str
    judge: Any = None
    neg_centroid: Tensor | None = None
    pos_centroid: Tensor | None = None


@dataclass
class Task:
    """The prompts of one split and the neutral prompts, with the unsteered neutral log-probs."""

    split: str
    ids: list[str]
    prompts: list[str]
    neutral: list[str]
    clean_neutral: dict[int, Tensor] = field(default_factory=dict, repr=False)


@dataclass
class ArmValues:
    """One arm's per-unit values: per prompt and per neutral prompt."""

    name: str
    spec: dict[str, Any]
    texts: list[str]
    score: Tensor  # [n_prompts] probe P(positive) of the continuation (NaN: empty continuation)
    judge: Tensor  # [n_prompts] judge score (NaN: no judge)
    ppl: Tensor  # [n_prompts]
    distinct2: Tensor  # [n_prompts]
    loop: Tensor  # [n_prompts]
    neutral_kl: Tensor  # [n_neutral]

    def to_json(self, texts: bool = True) -> dict[str, Any]:
        """Plain JSON (NaN as null); `texts=False` leaves the generations out."""
        out: dict[str, Any] = {"name": self.name, "spec": self.spec}
        if texts:
            out["texts"] = self.texts
        for key in ("score", "judge", "ppl", "distinct2", "loop", "neutral_kl"):
            out[key] = getattr(self, key).tolist()
        return jsonable(out)


@torch.no_grad()
def concept_scores(
    model, probe: Probe, hook: str, read: str, texts: Sequence[str], batch_size: int = 16
) -> Tensor:
    """P(positive) of each text, read by the unsteered model at `hook` (NaN for an empty text)."""
    out = torch.full((len(texts),), float("nan"))
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if keep:
        docs = [Document(f"continuation/{i}", texts[i]) for i in keep]
        rows = forward_concepts(model, docs, [hook], pool=read, batch_size=batch_size)[hook]
        out[keep] = probe_scores(probe, rows)
    return out


@torch.no_grad()
def run_arm(
    model,
    task: Task,
    steering: Steering | None,
    readout: Readout,
    name: str,
    max_new_tokens: int,
    batch_size: int = 16,
    spec: Mapping[str, Any] | None = None,
) -> ArmValues:
    """Generate under `steering` (None: unsteered) and take every measure, per unit."""
    gen = steered_generate(model, task.prompts, steering, None, max_new_tokens, batch_size)
    judge = torch.full((len(task.prompts),), float("nan"))
    if readout.judge is not None:
        emb = readout.judge.embed(gen.completions)
        judge = domain_scores(emb, readout.neg_centroid, readout.pos_centroid)
    if not task.clean_neutral:
        rows = encode_texts(model, task.neutral)
        task.clean_neutral.update(steered_logprobs(model, rows, None, None, batch_size))
    info = {**(steering.describe() if steering is not None else {}), **dict(spec or {})}
    return ArmValues(
        name=name,
        spec=info,
        texts=gen.completions,
        score=concept_scores(
            model, readout.probe, readout.hook, readout.read, gen.completions, batch_size
        ),
        judge=judge,
        ppl=continuation_perplexity(model, gen.new_tokens, batch_size),
        distinct2=distinct_n(gen.new_tokens),
        loop=has_loop(gen.new_tokens),
        neutral_kl=neutral_kl_values(model, task.neutral, steering, batch_size, task.clean_neutral),
    )


# ---------------------------------------------------------------- statistics


def unit_values(arm: ArmValues, base: ArmValues, measure: str) -> Tensor:
    """Per-unit values of `measure` for `arm` against `base` (log ratios for ratio measures)."""
    if measure == "concept_shift":
        return arm.score.double() - base.score.double()
    if measure == "concept_score":
        return arm.score.double()
    if measure == "judge_shift":
        return arm.judge.double() - base.judge.double()
    if measure == "fluency_ratio":
        return torch.log(arm.ppl.double() / base.ppl.double())
    if measure == "diversity_ratio":
        return torch.log(arm.distinct2.double() / base.distinct2.double())
    if measure == "loop_rate":
        return arm.loop.double()
    if measure == "neutral_kl":
        return arm.neutral_kl.double()
    raise KeyError(f"unknown measure {measure!r}; known: {', '.join(MEASURES)}")


def _value(x: Tensor, log: bool) -> float:
    """nan-mean of per-unit values (exp of it for a log ratio); NaN when none is defined."""
    x = x[~torch.isnan(x)]
    if len(x) == 0:
        return float("nan")
    v = float(x.mean())
    return math.exp(v) if log else v


def point_measures(arm: ArmValues, base: ArmValues, measures: Sequence[str]) -> dict[str, float]:
    """Every measure of `arm` against `base` (point values over all units)."""
    return {m: _value(unit_values(arm, base, m), MEASURES[m].log) for m in measures}


def _cell(x: Tensor, log: bool, n_boot: int, seed: int) -> dict[str, float]:
    """{"value", "lo", "hi"}: mean and percentile bootstrap interval (exp'd for log ratios)."""
    v, lo, hi = bootstrap_mean(x, n_boot=n_boot, seed=seed)
    f = math.exp if log else (lambda t: t)
    return {
        "value": f(v) if not math.isnan(v) else v,
        "lo": f(lo) if not math.isnan(lo) else lo,
        "hi": f(hi) if not math.isnan(hi) else hi,
    }


def summarize(
    results: Mapping[str, ArmValues],
    measures: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
    reference: str = REFERENCE,
) -> dict[str, Any]:
    """Every arm's measures with bootstrap intervals over prompts (neutral prompts for KL), and
    each aggregator's concept (and judge) shift paired with the mean difference's on the same
    prompts: the interval of the per-prompt difference. The same seed resamples the same prompts
    for every arm."""
    base = results["unsteered"]
    arms = {
        name: {m: _cell(unit_values(r, base, m), MEASURES[m].log, n_boot, seed) for m in measures}
        for name, r in results.items()
    }
    paired = {}
    if reference in results:
        ref = results[reference]
        for name, r in results.items():
            if name in (reference, "unsteered"):
                continue
            paired[f"{name}_vs_{reference}"] = {
                m: {
                    **{("diff" if k == "value" else k): v for k, v in _cell(
                        unit_values(r, base, m) - unit_values(ref, base, m), False, n_boot, seed
                    ).items()},
                }
                for m in measures
                if m in ("concept_shift", "judge_shift")
            }  # fmt: skip
    return {"level": 0.95, "n_boot": n_boot, "arms": arms, "paired": paired}


def random_p_values(
    observed: Mapping[str, float], random: Sequence[Mapping[str, float]]
) -> dict[str, float]:
    """Per measure: (1 + #random at least as good) / (1 + n), in the measure's direction of
    better (lower for fluency ratio, loops and KL)."""
    out = {}
    for name, obs in observed.items():
        null = torch.tensor([r[name] for r in random], dtype=torch.float64)
        null = null[~torch.isnan(null)]
        if math.isnan(obs) or len(null) == 0:
            out[name] = float("nan")
            continue
        sign = 1.0 if MEASURES[name].higher_is_better else -1.0
        out[name] = empirical_p(sign * obs, sign * null)
    return out


__all__ = [
    "MEASURES",
    "REFERENCE",
    "ArmValues",
    "Measure",
    "Readout",
    "Task",
    "concept_scores",
    "layered",
    "point_measures",
    "random_p_values",
    "run_arm",
    "summarize",
    "unit_values",
]
