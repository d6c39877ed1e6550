"""Steering with contrast vectors, measured as the lock's steering is: choose on validation, test once.

Owns the protocol for vectors aggregated from a contrast set (`contrast`, `aggregate`): its
options, the arms it runs (unsteered; each aggregator's vector at a scale sweep, one vector per
layer, all layers added at once; covariance-drawn random directions at each chosen arm's norm),
the choice of each aggregator's scale and positions on the validation prompts, one evaluation on
the test prompts, the report, and the vector files with their provenance. How one arm is measured
and summarised (the concept effect, bootstrap intervals, p-values against the random directions)
is `contrast_arms`'s; hooks and generation are the lock's (`lock.steering`); knows nothing of the
CLI or of plotting.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from analoglock.lock.steering.arms import select
from analoglock.lock.steering.hooks import SteeringError, check_positions, covariance_directions
from analoglock.lock.steering.prompts import NEUTRAL_PROMPTS, check_prompt_lengths
from analoglock.lock.steering.summary import jsonable
from analoglock.relations.aggregate import PROBE_L2, check_aggregators
from analoglock.relations.contrast import (
    Contrast,
    ContrastVectors,
    check_read,
    contrast_vectors,
    harvest_contrast,
    heldout_probe,
    layer_hooks,
)
from analoglock.relations.contrast_arms import (
    MEASURES,
    ArmValues,
    Readout,
    Task,
    layered,
    point_measures,
    random_p_values,
    run_arm,
    summarize,
)

log = logging.getLogger(__name__)

VECTOR_FILE = "vector-{}.safetensors"  # one per aggregator, beside steer.json


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
        from analoglock.lock.judge import centroid

        train = contrast.indices("train")
        readout.judge = judge
        readout.neg_centroid = centroid(judge, [contrast.neg_texts[i] for i in train])
        readout.pos_centroid = centroid(judge, [contrast.pos_texts[i] for i in train])
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
    "ContrastOptions",
    "export_vectors",
    "steer_contrast",
]
