"""Steering with contrast vectors, measured as the lock's steering is: choose on validation, test once.

Owns the protocol for vectors aggregated from a contrast set (`contrast`, `aggregate`): the arms
(unsteered; each aggregator's vector at a scale sweep, one vector per layer, all layers added at
once; covariance-drawn random directions at each chosen arm's norm), the per-prompt measures, the
choice of each aggregator's scale and positions on the validation prompts, one evaluation on the
test prompts, bootstrap intervals, empirical p-values against the random directions, and the
vector files with their provenance. Hooks, generation, fluency, diversity, loops and neutral KL
are the lock's (`lock.steering`); knows nothing of the CLI or of plotting.

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

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.data import Document
from analoglock.lock.steering.evaluate import select
from analoglock.lock.steering.hooks import (
    Steering,
    SteeringError,
    check_positions,
    covariance_directions,
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
from analoglock.lock.steering.prompts import NEUTRAL_PROMPTS, check_prompt_lengths
from analoglock.lock.steering.summary import jsonable
from analoglock.relations.aggregate import PROBE_L2, check_aggregators, probe_scores
from analoglock.relations.concepts import forward_concepts
from analoglock.relations.contrast import (
    Contrast,
    ContrastVectors,
    check_read,
    contrast_vectors,
    harvest_contrast,
    heldout_probe,
    layer_hooks,
)
from analoglock.relations.vectors import Probe
from analoglock.stats import bootstrap_mean, empirical_p
from analoglock.tokens import encode_texts

log = logging.getLogger(__name__)

REFERENCE = "meandiff"  # the paired comparisons hold every aggregator against the mean difference
VECTOR_FILE = "vector-{}.safetensors"  # one per aggregator, beside steer.json


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


# ---------------------------------------------------------------- options


@dataclass
class ContrastOptions:
    """How `steer_contrast` builds, steers and measures (the CLI's config mirrors these)."""

    aggregators: Sequence[str] = ("meandiff", "pca", "probe")
    layers: Sequence[int] = (12,)
    """One vector per `blocks.N.hook_resid_post`; every layer's vector is added at once."""
    read: str = "mean"
    """A text's row: the mean over its tokens ("mean": what a whole continuation says, where its
    last token may stop mid-sentence) or its last token ("last")."""
    probe_layer: int | None = None
    """Where the probe reads continuations (None: the last of `layers`)."""
    scales: Sequence[float] = (1.0, 2.0, 4.0, 8.0)
    """x + scale * v, tried on validation; every vector has the mean difference's norm."""
    positions: Sequence[str] = ("all",)
    """Positions rules tried on validation: prompt | new | all (no roles in a contrast set)."""
    n_random: int = 20
    max_new_tokens: int = 40
    max_sentences: int = 2
    n_prompts: int | None = None
    """Only the first n prompts of each split (None: all)."""
    prompts: Sequence[str] | None = None
    """User prompts evaluated on test instead of the test split's negative side."""
    max_fluency: float = 1.5
    min_diversity: float = 0.8
    probe_l2: float = PROBE_L2
    judge: bool = True
    """Pair datasets: also the sentence judge's domain shift (needs the judge package)."""
    batch_size: int = 16
    seed: int = 0
    n_boot: int = 2000
    truncate: bool = False
    progress: bool = True

    def check(self) -> None:
        """Refuse bad options before any model work."""
        self.aggregators = check_aggregators(self.aggregators)
        layer_hooks(self.layers)
        if self.probe_layer is not None:
            layer_hooks([self.probe_layer])
        check_read(self.read)
        if not self.scales or not self.positions:
            raise SteeringError("scale and vector_positions each need at least one value.")
        for p in self.positions:
            check_positions(p)
            if p == "roles":
                raise SteeringError(
                    "vector_positions=roles: a contrast set has no aligned roles; use prompt, new "
                    "or all."
                )
        for s in self.scales:
            if not math.isfinite(float(s)):
                raise SteeringError(f"scale={s} is not finite; give finite numbers.")
        if self.n_random < 1:
            raise SteeringError("n_random must be >= 1: each vector is read against random ones.")
        if self.n_prompts is not None and self.n_prompts < 1:
            raise SteeringError(f"n_prompts={self.n_prompts}: give at least 1 (or null: all).")

    def hooks(self, n_layers: int) -> tuple[list[str], str]:
        """(steered hooks, probe hook), checked against a model of `n_layers` layers."""
        hooks = layer_hooks(self.layers, n_layers)
        probe_layer = max(self.layers) if self.probe_layer is None else self.probe_layer
        return hooks, layer_hooks([probe_layer], n_layers)[0]


# ---------------------------------------------------------------- one steering, several layers


@dataclass(frozen=True)
class LayeredSteering:
    """Vectors at several hooks added at once (`x + scale v_h` at each, on the same positions), as
    a multi-layer control vector acts; used wherever generation and scoring take a `Steering`."""

    parts: tuple[Steering, ...]

    @property
    def positions(self) -> str:
        """The positions rule every part shares."""
        return self.parts[0].positions

    def hooks(self, mask: Tensor | None) -> list:
        """Fresh hooks of every part for one pass over a batch with `mask`."""
        return [h for p in self.parts for h in p.hooks(mask)]

    @property
    def norm(self) -> float:
        """The norm of the whole push: sqrt of the sum over hooks of ||scale v_h||^2."""
        return math.sqrt(sum(float(p.norm) ** 2 for p in self.parts))

    def describe(self) -> dict[str, Any]:
        """Plain JSON: hooks, positions, scale, norm (total and per hook)."""
        return {
            "kind": "vector",
            "hooks": [p.hook for p in self.parts],
            "positions": self.positions,
            "scale": self.parts[0].strength,
            "norm": self.norm,
            "norms": {p.hook: p.norm for p in self.parts},
        }


def layered(
    model, vectors: Mapping[str, Tensor], scale: float, positions: str = "all"
) -> LayeredSteering:
    """`x + scale v_h` at every hook h of `vectors` (each checked as `vector_steering` checks)."""
    return LayeredSteering(
        tuple(vector_steering(model, h, v, scale, positions) for h, v in vectors.items())
    )


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
    steering: LayeredSteering | None,
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


# ---------------------------------------------------------------- selection


def _key(row: Mapping[str, Any]) -> tuple:
    """Largest concept shift, then judge shift, then the gentlest push."""

    def num(x: Any) -> float:
        return -math.inf if x is None or math.isnan(x) else float(x)

    return (num(row["concept_shift"]), num(row.get("judge_shift")), -row["norm"])


# ---------------------------------------------------------------- the protocol


def _task(model, contrast: Contrast, split: str, opts: ContrastOptions, prompts=None) -> Task:
    """The negative side's prompts of `split` (or user prompts), checked to fit the model."""
    if prompts is None:
        idx = contrast.indices(split)[: opts.n_prompts]
        ids, texts = [contrast.ids[i] for i in idx], [contrast.prompt_texts[i] for i in idx]
    else:
        texts = list(prompts)[: opts.n_prompts]
        ids, split = [f"prompt/{i:03d}" for i in range(len(texts))], "user prompts"
    texts = check_prompt_lengths(
        model, texts, ids, opts.max_new_tokens, opts.batch_size, opts.truncate
    )
    neutral = check_prompt_lengths(model, list(NEUTRAL_PROMPTS), None, 0, opts.batch_size)
    return Task(split, ids, texts, neutral)


def _readout(contrast: Contrast, probe, probe_hook, opts: ContrastOptions, judge) -> Readout:
    """The probe, and for a pair dataset the judge with centroids of the train texts."""
    readout = Readout(probe, probe_hook, opts.read)
    if contrast.kind == "pairs" and opts.judge:
        if judge is None:
            from analoglock.lock.judge import load_judge

            judge = load_judge()
        from analoglock.lock.judge import unit_mean

        train = contrast.indices("train")
        readout.judge = judge
        readout.neg_centroid = unit_mean(judge.embed([contrast.neg_texts[i] for i in train]))
        readout.pos_centroid = unit_mean(judge.embed([contrast.pos_texts[i] for i in train]))
    return readout


def steer_contrast(
    model, contrast: Contrast, opts: ContrastOptions | None = None, judge=None
) -> tuple[dict[str, Any], ContrastVectors]:
    """The whole protocol: harvest, aggregate, sweep on validation, choose, evaluate on test.

    Returns (strict-JSON report, the vectors). The report holds "source", "vectors" (norms and
    cosines), "probe" (its held-out accuracy), "selection" (each aggregator's chosen scale and
    positions), "sweep" (validation rows), "test" ("summary" with bootstrap intervals and paired
    differences vs the mean difference; "random" per aggregator: values and p-values of the
    random directions at its norm), "generations" and "per_prompt" values, and "seconds".
    """
    opts = opts or ContrastOptions()
    opts.check()
    clock = {"start": time.perf_counter()}
    hooks, probe_hook = opts.hooks(int(model.cfg.n_layers))
    measures = [m for m in MEASURES if m != "judge_shift" or (contrast.kind == "pairs" and opts.judge)]  # fmt: skip
    val = _task(model, contrast, "validation", opts)
    test = _task(model, contrast, "test", opts, opts.prompts)
    acts = harvest_contrast(
        model, contrast, list(dict.fromkeys([*hooks, probe_hook])), opts.read, opts.progress
    )
    vecs = contrast_vectors(acts, opts.aggregators, hooks, opts.probe_l2)
    probe, probe_info = heldout_probe(acts, probe_hook, opts.probe_l2)
    readout = _readout(contrast, probe, probe_hook, opts, judge)
    clock["harvest"] = time.perf_counter()
    kw = dict(max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size)

    # Validation: every (aggregator, positions, scale); each aggregator's best is chosen here only.
    base = run_arm(model, val, None, readout, "unsteered", **kw)
    settings = [(a, p, float(s)) for a in opts.aggregators for p in opts.positions for s in opts.scales]  # fmt: skip
    rows = []
    for agg, positions, scale in tqdm(settings, desc="contrast sweep", disable=not opts.progress):
        s = layered(model, vecs.vectors[agg], scale, positions)
        r = run_arm(model, val, s, readout, agg, **kw)
        rows.append(
            {"aggregator": agg, "scale": scale, "positions": positions, "norm": s.norm,
             **point_measures(r, base, measures)}
        )  # fmt: skip
    chosen = {
        a: select([r for r in rows if r["aggregator"] == a], opts, key=_key)
        for a in opts.aggregators
    }
    clock["sweep"] = time.perf_counter()

    # Test, once: the chosen settings, then random directions at each chosen norm.
    results = {"unsteered": run_arm(model, test, None, readout, "unsteered", **kw)}
    for agg in opts.aggregators:
        c = chosen[agg]
        s = layered(model, vecs.vectors[agg], c["scale"], c["positions"])
        results[agg] = run_arm(model, test, s, readout, agg, **kw)
    randoms: dict[tuple, list[ArmValues]] = {}
    random_of: dict[str, tuple] = {}
    for agg in opts.aggregators:
        c = chosen[agg]
        norms = tuple(round(abs(c["scale"]) * float(vecs.vectors[agg][h].norm()), 6) for h in hooks)
        key = (c["positions"], norms)
        random_of[agg] = key
        if key in randoms:
            continue
        dirs = {
            h: covariance_directions(vecs.cov[h], opts.n_random, n, opts.seed + k)
            for k, (h, n) in enumerate(zip(hooks, norms, strict=True))
        }
        randoms[key] = [
            run_arm(
                model, test, layered(model, {h: d[k] for h, d in dirs.items()}, 1.0, key[0]),
                readout, f"random_{len(randoms):d}_{k:02d}",
                spec={"random": "covariance", "index": k}, **kw,
            )
            for k in tqdm(range(opts.n_random), desc="random directions", disable=not opts.progress)
        ]  # fmt: skip
    clock["test"] = time.perf_counter()

    summary = summarize(results, measures, opts.n_boot, opts.seed)
    base_t = results["unsteered"]
    random_section = {}
    for agg in opts.aggregators:
        values = [point_measures(r, base_t, measures) for r in randoms[random_of[agg]]]
        observed = point_measures(results[agg], base_t, measures)
        random_section[agg] = {
            "kind": "covariance",
            "n": len(values),
            "positions": random_of[agg][0],
            "norm": results[agg].spec["norm"],
            "observed": observed,
            "values": {m: [v[m] for v in values] for m in measures},
            "p_values": random_p_values(observed, values),
        }
    first_random = randoms[random_of[opts.aggregators[0]]][0]
    generations = []
    for i, prompt in enumerate(test.prompts):
        g = {"id": test.ids[i], "prompt": prompt}
        g.update({name: r.texts[i] for name, r in results.items()})
        g["random"] = first_random.texts[i]
        generations.append(g)
    report = {
        "mode": "contrast",
        "source": contrast.describe(),
        "hooks": hooks,
        "read": opts.read,
        "aggregators": list(opts.aggregators),
        "measures": measures,
        "vectors": {"norms": vecs.norms(), "cosines": vecs.cosines()},
        "probe": probe_info,
        "judge": "judge_shift" in measures,
        "options": asdict(opts),
        "selection": {
            "split": "validation",
            "n_prompts": len(val.prompts),
            "criterion": {
                "maximise": "concept_shift",
                "max_fluency_ratio": opts.max_fluency,
                "min_diversity_ratio": opts.min_diversity,
            },
            "chosen": chosen,
        },
        "sweep": rows,
        "test": {
            "split": test.split,
            "n_prompts": len(test.prompts),
            "n_neutral": len(test.neutral),
            "arms": {name: r.spec for name, r in results.items()},
            "summary": summary,
            "random": random_section,
        },
        "generations": generations,
        "per_prompt": {
            **{name: r.to_json() for name, r in results.items()},
            **{r.name: r.to_json(texts=False) for rs in randoms.values() for r in rs},
        },
        "seconds": {
            "harvest": clock["harvest"] - clock["start"],
            "sweep": clock["sweep"] - clock["harvest"],
            "test": clock["test"] - clock["sweep"],
            "total": time.perf_counter() - clock["start"],
        },
    }
    return jsonable(report), vecs


# ---------------------------------------------------------------- vector files


def export_vectors(
    report: Mapping[str, Any], vecs: ContrastVectors, model: Mapping[str, Any], out_dir: str | Path
) -> dict[str, str]:
    """Each aggregator's vector as an analoglock control vector (`vector-<aggregator>.safetensors`,
    read by `analoglock-export-vector`), stored at its chosen scale, with provenance: model
    hash, hooks and layers, aggregator, data, the scale chosen on validation and the test effect
    measured at it. {aggregator: path, or "not exported: <why>"}."""
    from analoglock.model import EMBEDDED_MODELS
    from analoglock.vectors import VectorError, control_vector, save_safetensors

    out_dir = Path(out_dir)
    spec = str(model.get("spec", ""))
    hint = EMBEDDED_MODELS[spec].llama_cpp_arch if spec in EMBEDDED_MODELS else spec
    test = report["test"]
    written = {}
    for agg, by_hook in vecs.vectors.items():
        chosen = report["selection"]["chosen"][agg]
        effect = {m: c["value"] for m, c in test["summary"]["arms"][agg].items()}
        effect.update(
            arm=agg,
            positions=chosen["positions"],
            split=test["split"],
            n_prompts=test["n_prompts"],
            p_random=test["random"][agg]["p_values"],
        )
        try:
            cv = control_vector(
                by_hook, model=model, scale=chosen["scale"], model_hint=hint,
                source=f"contrast:{agg}", data=report["source"]["spec"],
                best_scale=chosen["scale"], effect=effect,
                extra={"aggregator": agg, "read": report["read"],
                       "direction": report["source"]["direction"],
                       "probe_heldout_accuracy": report["probe"]["heldout_accuracy"]},
            )  # fmt: skip
        except VectorError as err:
            written[agg] = f"not exported: {err}"
            log.warning("%s vector not exported: %s", agg, err)
            continue
        written[agg] = str(save_safetensors(cv, out_dir / VECTOR_FILE.format(agg)))
    return written


__all__ = [
    "MEASURES",
    "ArmValues",
    "ContrastOptions",
    "LayeredSteering",
    "Readout",
    "Task",
    "concept_scores",
    "export_vectors",
    "layered",
    "point_measures",
    "random_p_values",
    "run_arm",
    "select",
    "steer_contrast",
    "summarize",
    "unit_values",
]
