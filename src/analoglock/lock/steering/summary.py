"""Statistics of a steering run: per-unit measures of each arm, bootstrap summaries over prompts and
seeds, paired tests against the mean difference, empirical p against random directions, and the
benchmark's flat headline. Plain functions over `ArmResult`s; knows nothing of models or hooks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from analoglock.stats import empirical_p

REFERENCE_ARM = (
    "meandiff"  # paired tests compare every arm with the mean difference at matched fluency
)


def jsonable(obj: Any) -> Any:
    """Plain JSON: NaN and inf become None, tensors lists, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


@dataclass
class ArmResult:
    """One arm's per-unit values on one task: per prompt, per role item, per neutral prompt."""

    name: str
    spec: dict[str, Any]
    texts: list[str]
    new_tokens: list[list[int]]
    judge_score: Tensor  # [n_prompts] cos to B centroid - cos to A centroid
    analogue_rank: Tensor  # [n_prompts] rank of the own workplace analogue (NaN: none)
    ppl: Tensor  # [n_prompts] perplexity of the continuation alone
    distinct2: Tensor  # [n_prompts]
    loop: Tensor  # [n_prompts] 1.0 where a 4-gram repeats >= 3 times
    role_rank: Tensor  # [n_items]
    neutral_kl: Tensor  # [n_neutral]

    _TENSORS = (
        "judge_score",
        "analogue_rank",
        "ppl",
        "distinct2",
        "loop",
        "role_rank",
        "neutral_kl",
    )

    def to_json(self, texts: bool = True) -> dict[str, Any]:
        """Plain JSON (NaN as null); `texts=False` leaves out the generations."""
        out: dict[str, Any] = {"name": self.name, "spec": self.spec}
        if texts:
            out["texts"] = self.texts
            out["new_tokens"] = self.new_tokens
        for key in self._TENSORS:
            out[key] = [None if math.isnan(v) else v for v in getattr(self, key).tolist()]
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ArmResult:
        """Inverse of `to_json` (null back to NaN)."""
        tensors = {
            k: torch.tensor([float("nan") if v is None else v for v in obj[k]], dtype=torch.float32)
            for k in cls._TENSORS
        }
        return cls(
            obj["name"], dict(obj["spec"]), list(obj.get("texts", [])),
            [list(t) for t in obj.get("new_tokens", [])], **tensors,
        )  # fmt: skip


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Measure:
    """A statistic over units: the nan-mean of `num` values, over the nan-mean of `den` values
    when it is a ratio (fluency, diversity: both means over the same resampled prompts)."""

    unit: str  # "prompt" | "item" | "neutral"
    higher_is_better: bool
    ratio: bool = False


MEASURES: dict[str, Measure] = {
    "judge_shift": Measure("prompt", True),
    "analogue_top1": Measure("prompt", True),
    "analogue_mrr": Measure("prompt", True),
    "role_top1": Measure("item", True),
    "role_mrr": Measure("item", True),
    "fluency_ratio": Measure("prompt", False, ratio=True),
    "diversity_ratio": Measure("prompt", True, ratio=True),
    "loop_rate": Measure("prompt", False),
    "neutral_kl": Measure("neutral", False),
}


def unit_values(arm: ArmResult, base: ArmResult, measure: str) -> tuple[Tensor, Tensor | None]:
    """Per-unit numerator (and denominator, for ratios) of `measure` for `arm` against `base`."""
    r = arm.analogue_rank.double()
    rr = arm.role_rank.double()
    if measure == "judge_shift":
        return arm.judge_score.double() - base.judge_score.double(), None
    if measure == "analogue_top1":
        return torch.where(torch.isnan(r), r, (r == 1).double()), None
    if measure == "analogue_mrr":
        return 1.0 / r, None
    if measure == "role_top1":  # NaN stays NaN (an arm whose role transfer is not measured)
        return torch.where(torch.isnan(rr), rr, (rr == 1).double()), None
    if measure == "role_mrr":
        return 1.0 / rr, None
    if measure == "fluency_ratio":
        return arm.ppl.double(), base.ppl.double()
    if measure == "diversity_ratio":
        return arm.distinct2.double(), base.distinct2.double()
    if measure == "loop_rate":
        return arm.loop.double(), None
    if measure == "neutral_kl":
        return arm.neutral_kl.double(), None
    raise KeyError(f"unknown measure {measure!r}; known: {', '.join(MEASURES)}")


def _nanmean(x: Tensor, dim: int = -1) -> Tensor:
    """nanmean that gives NaN (not an error) over empty or all-NaN slices."""
    if x.shape[dim] == 0:
        shape = list(x.shape)
        del shape[dim]
        return torch.full(shape, float("nan"), dtype=x.dtype)
    return torch.nanmean(x, dim=dim)


def arm_measures(arm: ArmResult, base: ArmResult) -> dict[str, float]:
    """Every measure of `arm` against `base` on all units (point values)."""
    out = {}
    for name in MEASURES:
        num, den = unit_values(arm, base, name)
        value = _nanmean(num)
        if den is not None:
            value = value / _nanmean(den)
        out[name] = float(value)
    return out


def _stacked(
    runs: Sequence[Mapping[str, ArmResult]], arm: str, measure: str, base: str
) -> tuple[Tensor, Tensor | None]:
    """[n_seeds, n_units] numerators (and denominators) of `measure` for `arm` in every run."""
    pairs = [unit_values(run[arm], run[base], measure) for run in runs]
    nums = torch.stack([p[0] for p in pairs])
    dens = torch.stack([p[1] for p in pairs]) if pairs[0][1] is not None else None
    return nums, dens


def _boot(
    nums: Tensor, dens: Tensor | None, unit_idx: Tensor, seed_idx: Tensor
) -> Tensor:  # [n_boot]
    """The statistic on each bootstrap draw: units resampled (the same units for every seed),
    then seeds resampled; the statistic is the mean over the drawn seeds of each seed's value."""
    if nums.shape[1] == 0:
        return torch.full((len(unit_idx),), float("nan"), dtype=torch.float64)
    stat = _nanmean(nums[:, unit_idx], -1)  # [seeds, boot]
    if dens is not None:
        stat = stat / _nanmean(dens[:, unit_idx], -1)
    return _nanmean(stat.T.gather(1, seed_idx), -1)


def _point(nums: Tensor, dens: Tensor | None) -> float:
    """Mean over seeds of each seed's statistic on every unit."""
    stat = _nanmean(nums, -1)
    if dens is not None:
        stat = stat / _nanmean(dens, -1)
    return float(_nanmean(stat, -1))


def _interval(draws: Tensor, level: float) -> tuple[float, float]:
    """Percentile interval of bootstrap draws (NaN draws left out)."""
    draws = draws[~torch.isnan(draws)]
    if len(draws) == 0:
        return float("nan"), float("nan")
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(draws, q).tolist()
    return lo, hi


def _wilcoxon(diff: Tensor) -> float:
    """Two-sided Wilcoxon signed-rank p on per-unit differences (NaN when it cannot be run)."""
    from scipy.stats import wilcoxon

    d = diff[~torch.isnan(diff)].numpy()
    if len(d) == 0 or not (d != 0).any():
        return float("nan")
    try:
        return float(wilcoxon(d).pvalue)
    except ValueError:
        return float("nan")


def summarize(
    runs: Sequence[Mapping[str, ArmResult]] | Mapping[str, ArmResult],
    reference: str = REFERENCE_ARM,
    base: str = "unsteered",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    compare: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every arm's measures with bootstrap intervals, and paired tests of arms vs `reference`.

    `runs` holds one {arm name: ArmResult} per training seed (or one mapping for one seed), all
    on the same prompts. Intervals resample prompts (or role items, or neutral prompts) and seeds
    with replacement. Paired tests use the same draws for both arms: the interval of the
    difference, a bootstrap two-sided p, and a Wilcoxon signed-rank p on per-unit differences
    (averaged over seeds). `compare` names the arms tested against `reference` (default: all).
    """
    runs = [runs] if isinstance(runs, Mapping) else list(runs)
    if not runs:
        raise ValueError("summarize needs at least one run")
    arms = [a for a in runs[0] if all(a in r for r in runs)]
    if base not in arms:
        raise ValueError(f"every run needs the {base!r} arm to measure shifts against")
    gen = torch.Generator().manual_seed(int(seed))
    n_seeds = len(runs)
    seed_idx = torch.randint(n_seeds, (n_boot, n_seeds), generator=gen)
    units = {
        "prompt": len(runs[0][base].judge_score),
        "item": len(runs[0][base].role_rank),
        "neutral": len(runs[0][base].neutral_kl),
    }
    unit_idx = {u: torch.randint(max(n, 1), (n_boot, n), generator=gen) for u, n in units.items()}
    out: dict[str, Any] = {"n_seeds": n_seeds, "level": level, "n_boot": n_boot, **units}
    draws: dict[tuple[str, str], Tensor] = {}
    table: dict[str, dict[str, dict[str, float]]] = {}
    for arm in arms:
        table[arm] = {}
        for name, m in MEASURES.items():
            nums, dens = _stacked(runs, arm, name, base)
            draws[arm, name] = _boot(nums, dens, unit_idx[m.unit], seed_idx)
            lo, hi = _interval(draws[arm, name], level)
            table[arm][name] = {"value": _point(nums, dens), "lo": lo, "hi": hi}
    out["arms"] = table
    paired: dict[str, Any] = {}
    if reference in arms:
        for arm in compare if compare is not None else arms:
            if arm == reference or arm not in arms:
                continue
            rows = {}
            for name in MEASURES:
                d = draws[arm, name] - draws[reference, name]
                lo, hi = _interval(d, level)
                ok = d[~torch.isnan(d)]
                p_boot = (
                    float(min(1.0, 2 * min((ok <= 0).double().mean(), (ok >= 0).double().mean())))
                    if len(ok)
                    else float("nan")
                )
                a_num, _ = _stacked(runs, arm, name, base)
                r_num, _ = _stacked(runs, reference, name, base)
                rows[name] = {
                    "diff": table[arm][name]["value"] - table[reference][name]["value"],
                    "lo": lo,
                    "hi": hi,
                    "p_boot": p_boot,
                    "p_wilcoxon": _wilcoxon(_nanmean((a_num - r_num).T, -1)),
                }
            paired[f"{arm}_vs_{reference}"] = rows
    out["paired"] = paired
    return out


def random_p_values(
    observed: Mapping[str, float], random: Sequence[Mapping[str, float]]
) -> dict[str, float]:
    """Per measure: (1 + #random at least as good as observed) / (1 + n), in each measure's
    own direction of better (lower for fluency ratio, loops and KL)."""
    out = {}
    for name, m in MEASURES.items():
        obs = observed.get(name, float("nan"))
        null = torch.tensor([r[name] for r in random], dtype=torch.float64)
        null = null[~torch.isnan(null)]
        if math.isnan(obs) or len(null) == 0:
            out[name] = float("nan")
            continue
        sign = 1.0 if m.higher_is_better else -1.0
        out[name] = empirical_p(sign * obs, sign * null)
    return out


# ---------------------------------------------------------------- selection


HEADLINE_ARMS = {"": "lock", "meandiff_": "meandiff", "unsteered_": "unsteered"}


def headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The benchmark's flat numbers from a `summarize` output: the lock's (no prefix), the mean
    difference at matched fluency (meandiff_) and unsteered (unsteered_), with intervals."""
    out: dict[str, Any] = {"n_seeds": summary["n_seeds"], "n_prompts": summary["prompt"]}
    for prefix, arm in HEADLINE_ARMS.items():
        for name, cell in summary["arms"].get(arm, {}).items():
            out[prefix + name] = cell["value"]
            out[prefix + name + "_ci"] = [cell["lo"], cell["hi"]]
    return jsonable(out)
