"""The steering evaluation: arms, selection on validation, one evaluation on test, statistics.

Owns the protocol. Every arm (unsteered; the lock's map at alpha on chosen positions; the
shuffled-pairs control map at the same alpha and positions; the mean-difference vector at a
scale sweep; random directions drawn from the activations' covariance at the norm of the lock's
mean displacement) is measured per prompt on a split's story openings (`measures`). The lock's
alpha and positions, and the mean difference's scale, are chosen on the validation split only
(highest analogue MRR with fluency ratio <= 1.5 and diversity ratio >= 0.8); then the test split
is evaluated once. Per-unit values are kept (`ArmResult`), so `summarize` can bootstrap over
prompts and training seeds and pair every arm with the mean difference. Knows nothing of the CLI,
of plotting, or of how the lock was trained: it reads a `LockArtifact`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.data.loaders import SPLITS, load_pairs
from analoglock.lock.judge import Judge, load_judge, unit_mean
from analoglock.lock.steering.hooks import (
    RowPositions,
    Steering,
    SteeringError,
    check_positions,
    covariance_directions,
    map_steering,
    steered_generate,
    steered_logprobs,
    vector_steering,
)
from analoglock.lock.steering.measures import (
    chance_mrr,
    continuation_perplexity,
    cosine_ranks,
    distinct_n,
    domain_scores,
    has_loop,
    neutral_kl_values,
    role_transfer_ranks,
)
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
from analoglock.lock.steering.summary import (
    MEASURES,
    ArmResult,
    arm_measures,
    jsonable,
    random_p_values,
    summarize,
)
from analoglock.tokens import encode_texts, prepend_bos_id

log = logging.getLogger(__name__)


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
        a_centroid=unit_mean(judge.embed([p.a for p in refs])),
        b_centroid=unit_mean(judge.embed([p.b for p in refs])),
        candidates=judge.embed([p.b for p in pairs]) if prompts is None else torch.zeros(0, 1),
    )


# ---------------------------------------------------------------- one arm


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
    """Generate under `steering` (None: unsteered) and take every measure, per unit."""
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
    info = dict(spec or {})
    if steering is not None:
        info = {**steering.describe(), **info}
    return ArmResult(
        name=name,
        spec=info,
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
) -> tuple[dict[str, ArmResult], list[ArmResult]]:
    """The chosen arms once on `task`, and the random directions: ({name: result}, randoms)."""
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
    done: dict[tuple, ArmResult] = {}
    for name, s in tqdm(arms.items(), desc=f"steer arms ({task.split})", disable=not opts.progress):
        key = (s.kind, s.positions, s.strength) if s is not None and s.kind == "vector" else None
        if key is not None and key in done:  # the same mean-difference setting under two names
            results[name] = replace(done[key], name=name)
            continue
        results[name] = run_arm(model, task, s, judge, name, **kw)
        if key is not None:
            done[key] = results[name]
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


def run_steering(
    model,
    artifact,
    opts: SteerOptions | None = None,
    dataset: str | None = None,
    judge: Judge | None = None,
) -> dict[str, Any]:
    """The whole protocol for one lock artifact: sweep on validation, choose, evaluate on test.

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
    val = build_task(model, judge, dataset, opts.select_split, opts)
    test = build_task(model, judge, dataset, opts.eval_split, opts, prompts=opts.prompts)
    rows, _ = sweep(model, artifact, val, judge, opts, hook)
    choice = choose(rows, opts)
    results, randoms = evaluate_test(model, artifact, test, judge, choice, opts, hook)
    summary = summarize(results, n_boot=opts.n_boot, seed=opts.seed)
    base = results["unsteered"]
    lock_values = arm_measures(results["lock"], base)
    random_values = [arm_measures(r, base) for r in randoms]
    generations = []
    for i, p in enumerate(test.prompts):
        item = {"id": p.id, "prompt": p.text}
        for name in ("unsteered", "lock", "meandiff", "control_map"):
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
