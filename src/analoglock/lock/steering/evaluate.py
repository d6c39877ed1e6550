"""The steering evaluation: the sweep on validation, the choice, one evaluation on test, the report.

Owns the protocol. Every arm (unsteered; the lock's map at alpha on chosen positions; the
shuffled-pairs control map at the same alpha and positions; the mean-difference vector at a
scale sweep; random directions drawn from the activations' covariance at the norm of the lock's
mean displacement) is measured per prompt on a split's story openings (`task`, `arms`,
`measures`). The lock's alpha and positions, and the mean difference's scale, are chosen on the
validation split only (highest analogue MRR with fluency ratio <= 1.5 and diversity ratio >= 0.8;
`arms.select`); then the test split is evaluated once. Per-unit values are kept (`ArmResult`), so
`summarize` can bootstrap over prompts and training seeds and pair every arm with the mean
difference. Knows nothing of the CLI, of plotting, or of how the lock was trained: it reads a
`LockArtifact`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from analoglock.lock.judge import Judge, load_judge
from analoglock.lock.steering.arms import fluency_matched, run_arm, select
from analoglock.lock.steering.hooks import (
    Steering,
    SteeringError,
    covariance_directions,
    map_steering,
    vector_steering,
)
from analoglock.lock.steering.prompts import asked_prompts, check_prompt_lengths, resolve_ask
from analoglock.lock.steering.summary import (
    MEASURES,
    ArmResult,
    arm_measures,
    jsonable,
    random_p_values,
    summarize,
)
from analoglock.lock.steering.task import SteeringTask, SteerOptions, build_task

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the protocol


def _lock_norm(artifact, alpha: float) -> float:
    """||alpha * mean(M(x) - x)|| over the training A rows: what the random directions match."""
    if "learned" not in artifact.vectors:
        raise SteeringError(
            "the artifact has no 'learned' vector (the map's mean displacement on training A "
            f"rows); it holds {sorted(artifact.vectors)}. Re-export it with analoglock-train."
        )
    return abs(alpha) * float(artifact.vectors["learned"].float().norm())


def sweep(
    model, artifact, task: SteeringTask, judge: Judge, opts: SteerOptions, hook: str
) -> tuple[list[dict[str, Any]], ArmResult]:
    """Every lock (alpha, positions) and mean-difference (scale, positions) setting on `task`,
    as rows of point measures (plus "arm", "alpha"/"scale", "positions", "norm")."""
    kw = dict(max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size)
    base = run_arm(model, task, None, judge, "unsteered", **kw)
    meandiff = artifact.vectors.get("meandiff")
    settings: list[tuple[str, float, str]] = [
        ("lock", float(a), p) for p in opts.positions for a in opts.alphas
    ]
    if meandiff is not None:
        settings += [
            ("meandiff", float(s), p) for p in opts.meandiff_positions for s in opts.scales
        ]
    else:
        log.warning("the artifact has no 'meandiff' vector; the mean-difference arm is left out")
    rows = []
    for arm, strength, positions in tqdm(
        settings, desc=f"steer sweep ({task.split})", disable=not opts.progress
    ):
        if arm == "lock":
            s = map_steering(
                model, artifact.mapper, artifact.hook, strength, positions, hook,
                opts.allow_extrapolation,
            )  # fmt: skip
            norm, key = _lock_norm(artifact, strength), "alpha"
        else:
            s = vector_steering(model, hook, meandiff, strength, positions)
            norm, key = float(s.norm), "scale"
        result = run_arm(model, task, s, judge, arm, **kw)
        row = {"arm": arm, key: strength, "positions": positions, "norm": norm}
        row.update(arm_measures(result, base))
        if arm == "lock" and "applied_norm" in s.describe():
            row["applied_norm"] = s.describe()["applied_norm"]
        rows.append(row)
    return rows, base


def choose(rows: Sequence[Mapping[str, Any]], opts: SteerOptions) -> dict[str, Any]:
    """The lock's setting and the mean difference's (best; fluency-matched) from sweep rows."""
    lock = select([r for r in rows if r["arm"] == "lock"], opts)
    out: dict[str, Any] = {"lock": lock}
    md = [r for r in rows if r["arm"] == "meandiff"]
    if md:
        out["meandiff_best"] = select(md, opts)
        out["meandiff"] = fluency_matched(md, lock["fluency_ratio"])
    return out


def evaluate_test(
    model,
    artifact,
    task: SteeringTask,
    judge: Judge,
    choice: Mapping[str, Any],
    opts: SteerOptions,
    hook: str,
    ask: str | None = None,
) -> tuple[dict[str, ArmResult], list[ArmResult]]:
    """The chosen arms once on `task`, and the random directions: ({name: result}, randoms).

    `ask` (an instruction with "{prompt}"): also the "asked" reference arm, unsteered, with each
    opening inside the instruction (`prompts.asked_prompts`); its role transfer is not measured
    (the teacher-forced fable prefixes carry no instruction), so its role ranks are NaN."""
    kw = dict(max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size)
    lock = choice["lock"]
    alpha, positions = float(lock["alpha"]), lock["positions"]
    norm = _lock_norm(artifact, alpha)
    arms: dict[str, Steering | None] = {
        "unsteered": None,
        "lock": map_steering(
            model, artifact.mapper, artifact.hook, alpha, positions, hook, opts.allow_extrapolation
        ),
    }
    if artifact.control_mapper is not None:
        arms["control_map"] = map_steering(
            model, artifact.control_mapper, artifact.hook, alpha, positions, hook,
            opts.allow_extrapolation,
        )  # fmt: skip
    meandiff = artifact.vectors.get("meandiff")
    if meandiff is not None:
        for name in ("meandiff", "meandiff_best"):
            arms[name] = vector_steering(
                model, hook, meandiff, choice[name]["scale"], choice[name]["positions"]
            )
    results: dict[str, ArmResult] = {}
    for name, s in tqdm(arms.items(), desc=f"steer arms ({task.split})", disable=not opts.progress):
        # the same mean-difference setting under two names is measured once (`run_arm`)
        results[name] = run_arm(model, task, s, judge, name, **kw)
    if ask is not None:
        results["asked"] = _asked(model, task, judge, ask, opts)
    if opts.random_norm == "applied":
        norm = float(results["lock"].spec.get("applied_norm", norm))
    md_norm = float(meandiff.float().norm()) if meandiff is not None else 0.0
    if md_norm > 0:  # the mean difference at the controls' norm, on the lock's positions
        s = vector_steering(model, hook, meandiff, norm / md_norm, positions)
        results["meandiff_norm"] = run_arm(model, task, s, judge, "meandiff_norm", **kw)
    cov = artifact.vectors.get("cov_a")
    if cov is not None:
        dirs, kind = covariance_directions(cov, opts.n_random, norm, opts.seed), "covariance"
    else:
        log.warning("the artifact has no 'cov_a'; random directions are isotropic instead")
        gen = torch.Generator().manual_seed(int(opts.seed))
        z = torch.randn(opts.n_random, int(model.cfg.d_model), generator=gen)
        dirs, kind = z / z.norm(dim=-1, keepdim=True) * norm, "isotropic"
    randoms = []
    for k in tqdm(range(len(dirs)), desc="steer random directions", disable=not opts.progress):
        s = vector_steering(model, hook, dirs[k], 1.0, positions)
        spec = {"random": kind, "index": k}
        randoms.append(run_arm(model, task, s, judge, f"random_{k:02d}", spec=spec, **kw))
    return results, randoms


def _asked(model, task: SteeringTask, judge: Judge, ask: str, opts: SteerOptions) -> ArmResult:
    """The asked reference arm: no steering; each opening inside the instruction `ask`."""
    prompts = asked_prompts(model, task.prompts, ask)
    texts = check_prompt_lengths(
        model, [p.text for p in prompts], [p.id for p in prompts], opts.max_new_tokens,
        opts.batch_size, opts.truncate,
    )  # fmt: skip
    prompts = [replace(p, text=t) for p, t in zip(prompts, texts, strict=True)]
    asked = replace(task, prompts=prompts, role_positions=[()] * len(prompts))
    spec = {"reference": "asked", "instruction": ask}
    result = run_arm(
        model, asked, None, judge, "asked", opts.max_new_tokens, opts.batch_size, spec=spec
    )
    result.role_rank = torch.full_like(result.role_rank, float("nan"))
    return result


def run_steering(
    model,
    artifact,
    opts: SteerOptions | None = None,
    dataset: str | None = None,
    judge: Judge | None = None,
    tasks: dict[tuple[str, str], SteeringTask] | None = None,
) -> dict[str, Any]:
    """The whole protocol for one lock artifact: sweep on validation, choose, evaluate on test.

    `tasks` (a dict, possibly empty) keeps each (dataset, split)'s task between calls, so several
    lock runs with the same options and judge share the prompts and what was measured on them:
    the unsteered model and the mean-difference vector are then measured once, not per run.

    Returns a strict-JSON report (NaN as null): "selection", "sweep" (validation rows), "test"
    (sizes, chance levels, "summary" with bootstrap intervals and paired tests vs the mean
    difference, "random" with the random directions' values and p-values), "generations" (per
    prompt: unsteered, lock, mean difference and the data's workplace analogue), and
    "per_prompt" (every arm's per-unit values; `arm_results` reads them back for `summarize`).
    """
    opts = opts or SteerOptions()
    opts.check()
    dataset = dataset or artifact.cfg.get("dataset")
    if not dataset:
        raise SteeringError("the artifact names no dataset (cfg['dataset']); pass dataset=...")
    hook = opts.hook or artifact.hook
    # Refuse a map at a foreign hook, or alpha outside [0, 1], before loading the judge.
    map_steering(
        model, artifact.mapper, artifact.hook, float(opts.alphas[0]), opts.positions[0], hook,
        opts.allow_extrapolation,
    )  # fmt: skip
    judge = judge if judge is not None else load_judge()
    tasks = {} if tasks is None else tasks
    for split, prompts in ((opts.select_split, None), (opts.eval_split, opts.prompts)):
        if (dataset, split) not in tasks:
            tasks[dataset, split] = build_task(model, judge, dataset, split, opts, prompts=prompts)
    val, test = tasks[dataset, opts.select_split], tasks[dataset, opts.eval_split]
    rows, _ = sweep(model, artifact, val, judge, opts, hook)
    choice = choose(rows, opts)
    ask = resolve_ask(opts.ask, dataset, model) if opts.prompts is None else None
    results, randoms = evaluate_test(model, artifact, test, judge, choice, opts, hook, ask)
    summary = summarize(results, n_boot=opts.n_boot, seed=opts.seed)
    base = results["unsteered"]
    lock_values = arm_measures(results["lock"], base)
    random_values = [arm_measures(r, base) for r in randoms]
    generations = []
    for i, p in enumerate(test.prompts):
        item = {"id": p.id, "prompt": p.text}
        for name in ("unsteered", "lock", "meandiff", "control_map", "asked"):
            if name in results:
                item[name] = results[name].texts[i]
        item["random"] = randoms[0].texts[i]
        item["analogue"] = p.analogue
        generations.append(item)
    report = {
        "dataset": dataset,
        "hook": hook,
        "map_kind": artifact.cfg.get("kind"),
        "norms": {
            "learned": float(artifact.vectors["learned"].norm()),
            **(
                {"meandiff": float(artifact.vectors["meandiff"].norm())}
                if "meandiff" in artifact.vectors
                else {}
            ),
        },  # fmt: skip
        "options": asdict(opts),
        "selection": {
            "split": opts.select_split,
            **val.sizes(),
            "criterion": {
                "maximise": "analogue_mrr",
                "max_fluency_ratio": opts.max_fluency,
                "min_diversity_ratio": opts.min_diversity,
            },
            **choice,
        },
        "sweep": rows,
        "test": {
            "split": opts.eval_split if opts.prompts is None else "user prompts",
            **test.sizes(),
            "chance": test.chance,
            "arms": {name: r.spec for name, r in results.items()},
            "summary": summary,
            "random": {
                "kind": randoms[0].spec["random"] if randoms else None,
                "n": len(randoms),
                "norm": randoms[0].spec["norm"],
                "norm_rule": opts.random_norm,
                "lock_applied_norm": results["lock"].spec.get("applied_norm"),
                "lock": lock_values,
                "values": {m: [v[m] for v in random_values] for m in MEASURES},
                "p_values": random_p_values(lock_values, random_values),
            },
        },
        "generations": generations,
        "per_prompt": {
            **{name: r.to_json() for name, r in results.items()},
            **{r.name: r.to_json(texts=False) for r in randoms},
        },
    }
    return jsonable(report)


def arm_results(report: Mapping[str, Any], randoms: bool = False) -> dict[str, ArmResult]:
    """The per-unit results of a `run_steering` report, for `summarize` over several seeds."""
    return {
        name: ArmResult.from_json(obj)
        for name, obj in report["per_prompt"].items()
        if randoms or not name.startswith("random_")
    }
