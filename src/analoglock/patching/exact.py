"""Exact feature-to-feature effects: intervene on each upstream feature, rerun h1 -> h2, measure.

Definition (the number every other method in this package approximates or decomposes):

    E[i, j] = (1 / |M|) * sum over prompts b, measure positions p in M_b of
              V.encode(x2_b^{do(i)})[p, j] - V.encode(x2_b)[p, j]

where x2_b is prompt b's clean activation at h2, x2_b^{do(i)} the activation at h2 after adding
delta_i[t] = c_i[t] * d_i at h1 at every intervention position t of prompt b at once (c from the
`Intervention`, d_i = U.directions[i]), and |M| the number of measure positions pooled over the
prompt set (by default every valid, non-BOS token: a per-position mean). The control C[i, j] is the
same with d_i replaced by a random direction of equal norm (`interventions.random_directions`).

Cost: one batched rerun of blocks start..end per upstream feature (all downstream codes come
from that one run); features whose coefficient is zero on a prompt are skipped (their effect is
exactly 0). Interventions are stacked in the batch dimension, `batch_tokens` tokens per rerun.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.patching.interventions import (
    Deltas,
    InterventionError,
    MeanAblate,
    random_directions,
)
from analoglock.patching.prompts import Prompt
from analoglock.patching.segment import CleanRun, PatchSetupError, Segment

log = logging.getLogger(__name__)


@dataclass
class Effects:
    """E[i, j] for upstream features `upstream[i]` and downstream codes `downstream[j]`, with controls."""

    effect: Annotated[Tensor, "n_up n_down"]
    control: Annotated[Tensor, "n_up n_down"] | None
    upstream: Tensor  # long: upstream feature ids (rows)
    downstream: Tensor  # long: downstream feature ids (columns)
    method: str  # "exact" | "attribution"
    intervention: str
    n_positions: int  # measure positions averaged over
    seconds: float = 0.0
    routes: str = "all"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Small JSON-ready summary (no matrices)."""
        return {
            "method": self.method,
            "intervention": self.intervention,
            "n_upstream": len(self.upstream),
            "n_downstream": len(self.downstream),
            "n_positions": self.n_positions,
            "seconds": round(self.seconds, 3),
            "routes": self.routes,
            **self.extra,
        }


def clean_runs(
    segment: Segment, prompts: Sequence[Prompt], progress: bool = True
) -> list[CleanRun]:
    """One clean pass per prompt (plus its source prompt up to h1 when it has one)."""
    if not prompts:
        raise PatchSetupError("The prompt set is empty.")
    out = []
    for p in tqdm(prompts, desc="clean runs", unit="prompt", disable=not progress):
        run = segment.clean(p.ids, p.source_ids)
        run.intervene, run.measure = p.intervene, p.measure
        out.append(run)
    return out


def feature_ids(ids: Sequence[int] | Tensor | None, n: int, what: str) -> Tensor:
    """Validated long tensor of feature ids (all of 0..n-1 when None)."""
    if ids is None:
        return torch.arange(n)
    t = torch.as_tensor(list(ids) if not isinstance(ids, Tensor) else ids, dtype=torch.long)
    if t.ndim != 1 or len(t) == 0:
        raise PatchSetupError(f"{what} feature ids must be a non-empty list")
    bad = t[(t < 0) | (t >= n)]
    if len(bad):
        raise PatchSetupError(f"{what} feature ids {bad.tolist()[:5]} out of range 0..{n - 1}")
    return t


def check_bases(segment: Segment, upstream, downstream, cleans: Sequence[CleanRun]) -> None:
    """Bases must match the hooks' widths (and hooks, when the bases record one)."""
    d1, d2 = cleans[0].x1.shape[-1], cleans[0].x2.shape[-1]
    for basis, site, width, side in ((upstream, segment.h1, d1, "upstream"), (downstream, segment.h2, d2, "downstream")):  # fmt: skip
        hook = getattr(basis, "hook", "")
        if hook and hook != site.name:
            raise PatchSetupError(
                f"The {side} basis was fit at {hook!r} but is used at {site.name!r}"
            )
        dims = getattr(basis, "d_model", None)
        if dims is not None and dims != width:
            raise PatchSetupError(
                f"The {side} basis has d_model={dims} but {site.name} has width {width}"
            )


def prepare_intervention(intervention, upstream, cleans: Sequence[CleanRun]):
    """Fill dataset statistics (MeanAblate's means over the intervention positions)."""
    if isinstance(intervention, MeanAblate) and intervention.means is None:
        with torch.no_grad():
            codes = [upstream.encode(c.x1)[c.intervene] for c in cleans]
        return intervention.with_means(codes)
    return intervention


def coefficients(intervention, upstream, clean: CleanRun) -> Annotated[Tensor, "pos n_up"]:
    """The code change per position and upstream feature, zero outside `clean.intervene`."""
    a = upstream.encode(clean.x1)
    a_src = None if clean.x1_source is None else upstream.encode(clean.x1_source)
    if a_src is None and getattr(intervention, "name", "") == "patch":
        raise InterventionError(
            "mode=patch needs counterfactual source prompts (build_prompts(..., sources=...))"
        )
    c = intervention.coefficients(a, a_src)
    return c * clean.intervene[:, None].to(c)


def measured_sum(downstream, x2: Annotated[Tensor, "n pos d2"], measure: Tensor, down: Tensor) -> Tensor:  # fmt: skip
    """Sum of the downstream codes `down` over the measure positions, per batch row -> [n, k]."""
    return downstream.encode(x2[:, measure])[..., down].sum(dim=1)


def setup_effects(
    segment: Segment,
    cleans: Sequence[CleanRun],
    upstream,
    downstream,
    intervention,
    upstream_ids: Sequence[int] | Tensor | None,
    downstream_ids: Sequence[int] | Tensor | None,
) -> tuple[Any, Tensor, Tensor, Tensor]:
    """Checked inputs shared by exact and attribution: intervention, feature ids, directions."""
    check_bases(segment, upstream, downstream, cleans)
    intervention = prepare_intervention(intervention, upstream, cleans)
    up = feature_ids(upstream_ids, upstream.n_features, "upstream")
    down = feature_ids(downstream_ids, downstream.n_features, "downstream")
    dirs = upstream.directions.detach().float().to(cleans[0].x1.device)
    return intervention, up, down, dirs


def _rows_per_batch(n_pos: int, batch_tokens: int, per_unit: int) -> int:
    """Interventions per rerun so each batch holds about batch_tokens tokens."""
    return max(1, batch_tokens // max(1, n_pos * per_unit))


@torch.no_grad()
def exact_effects(
    segment: Segment,
    cleans: Sequence[CleanRun],
    upstream,
    downstream,
    intervention,
    upstream_ids: Sequence[int] | Tensor | None = None,
    downstream_ids: Sequence[int] | Tensor | None = None,
    routes=None,
    control: bool = True,
    seed: int = 0,
    batch_tokens: int = 8192,
    progress: bool = True,
) -> Effects:
    """E[i, j] (and the random-direction control) by rerunning the segment once per feature."""
    t0 = time.perf_counter()
    intervention, up, down, dirs = setup_effects(
        segment, cleans, upstream, downstream, intervention, upstream_ids, downstream_ids
    )
    deltas = Deltas(dirs, random_directions(dirs, seed) if control else None)
    effect = torch.zeros(len(up), len(down), dtype=torch.float64)
    ctrl = torch.zeros_like(effect) if control else None
    n_meas = sum(int(c.measure.sum()) for c in cleans)
    per_unit = 2 if control else 1
    plans = []
    for clean in cleans:
        c = coefficients(intervention, upstream, clean)
        active = (c[:, up] != 0).any(dim=0).nonzero().flatten()  # rows of `up` to rerun
        plans.append((clean, c, active))
    total = sum(
        math.ceil(len(a) / _rows_per_batch(len(cl.ids), batch_tokens, per_unit))
        for cl, _, a in plans
    )
    bar = tqdm(total=total, desc=f"exact {segment.h1.name}->{segment.h2.name}", unit="batch", disable=not progress)  # fmt: skip
    for clean, c, active in plans:
        base = measured_sum(downstream, clean.x2[None], clean.measure, down)[0].double()
        k = _rows_per_batch(len(clean.ids), batch_tokens, per_unit)
        for rows in active.split(k) if len(active) else ():
            ids = up[rows]
            batch = [deltas.features(c, ids)]
            if control:
                batch.append(deltas.features(c, ids, control=True))
            x2 = segment.run(clean, torch.cat(batch), routes)
            sums = measured_sum(downstream, x2, clean.measure, down).double() - base
            effect[rows] += sums[: len(ids)]
            if control:
                ctrl[rows] += sums[len(ids) :]
            bar.update(1)
    bar.close()
    return Effects(
        effect=(effect / n_meas).float(),
        control=None if ctrl is None else (ctrl / n_meas).float(),
        upstream=up,
        downstream=down,
        method="exact",
        intervention=describe_intervention(intervention),
        n_positions=n_meas,
        seconds=time.perf_counter() - t0,
        routes=getattr(routes, "spec", "all"),
    )


@torch.no_grad()
def position_effects(
    segment: Segment,
    cleans: Sequence[CleanRun],
    upstream,
    downstream,
    intervention,
    group: Sequence[int] | Tensor | None = None,
    downstream_ids: Sequence[int] | Tensor | None = None,
    routes=None,
    batch_tokens: int = 8192,
) -> Annotated[Tensor, "pos n_down"]:
    """Effect of intervening on a feature group (default: all features) at one position at a time.

    Row t is the exact effect (mean over the measure positions, pooled over prompts) of editing
    the group's codes at position t only. All prompts must have the same length. With
    `IdentityBasis`, `Patch` and every feature in the group this is TransformerLens's
    `get_act_patch_resid_pre` at that layer, minus the unpatched metric.
    """
    lengths = {len(c.ids) for c in cleans}
    if len(lengths) != 1:
        raise PatchSetupError(
            f"position_effects needs prompts of one length, got {sorted(lengths)}"
        )
    check_bases(segment, upstream, downstream, cleans)
    intervention = prepare_intervention(intervention, upstream, cleans)
    g = feature_ids(group, upstream.n_features, "group")
    down = feature_ids(downstream_ids, downstream.n_features, "downstream")
    dirs = upstream.directions.detach().float().to(cleans[0].x1.device)[g]
    n_pos = lengths.pop()
    out = torch.zeros(n_pos, len(down), dtype=torch.float64)
    n_meas = sum(int(c.measure.sum()) for c in cleans)
    for clean in cleans:
        base = measured_sum(downstream, clean.x2[None], clean.measure, down)[0].double()
        per_pos = coefficients(intervention, upstream, clean)[:, g] @ dirs  # [pos, d_model]
        positions = clean.intervene.nonzero().flatten()
        for chunk in (
            positions.split(_rows_per_batch(n_pos, batch_tokens, 1)) if len(positions) else ()
        ):
            delta = torch.zeros(len(chunk), n_pos, dirs.shape[-1])
            delta[torch.arange(len(chunk)), chunk] = per_pos[chunk]
            x2 = segment.run(clean, delta, routes)
            out[chunk] += measured_sum(downstream, x2, clean.measure, down).double() - base
    return (out / n_meas).float()


def describe_intervention(intervention) -> str:
    """`ablate`, `partial(alpha=0.1)`, `mean`, `patch`."""
    alpha = getattr(intervention, "alpha", None)
    if alpha is not None and alpha != 1.0:
        return f"{intervention.name}(alpha={alpha:g})"
    return intervention.name
