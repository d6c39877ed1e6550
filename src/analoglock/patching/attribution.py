"""Attribution patching: a first-order estimate of every E[i, j] at once, and its agreement with exact.

With S_j^b = sum over prompt b's measure positions of downstream code j at h2, and
g_j^b[t] = dS_j^b / dx1[t] (the gradient at h1, at the clean point, through the same segment
`exact` reruns, so frozen routes cut it too), the estimate of `exact.exact_effects`'s E[i, j] is

    A[i, j] = (1 / |M|) * sum_b sum_{t in intervene_b} c_i[t] * (g_j^b[t] . d_i)

i.e. the gradient dotted with the intervention delta c_i[t] d_i (c = -a for full ablation). It is
exact to first order in the delta: A = lim_{alpha -> 0} E(alpha) / alpha for partial ablation.

Cost: one forward per prompt, then one vector-Jacobian product per downstream code (batched with
`torch.autograd.grad(..., is_grads_batched=True)`, i.e. vmap over grad outputs) -- all upstream
features come from the same gradients. Exact costs one forward per upstream feature instead.
`agreement` compares the two (Spearman over all pairs, top-k overlap, sign agreement);
`agreement_bootstrap` adds percentile intervals over upstream features (rows of the matrices).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from torch import Tensor
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef
from tqdm.auto import tqdm

from analoglock.patching.exact import (
    Effects,
    coefficients,
    describe_intervention,
    setup_effects,
)
from analoglock.patching.interventions import random_directions
from analoglock.patching.segment import CleanRun, PatchSetupError, Segment
from analoglock.stats import bootstrap_indices, percentile_interval

log = logging.getLogger(__name__)


def _vjps(total: Tensor, wrt: Tensor, rows: Tensor) -> Tensor:
    """Gradients of total[rows[k]] wrt `wrt`, stacked -> [k, *wrt.shape] (vmapped, loop fallback)."""
    eye = torch.zeros(len(rows), total.shape[0], dtype=total.dtype, device=total.device)
    eye[torch.arange(len(rows)), rows] = 1.0
    try:
        return torch.autograd.grad(
            total, wrt, grad_outputs=eye, is_grads_batched=True, retain_graph=True
        )[0]
    except RuntimeError as err:  # an op without a batching rule: one backward per code instead
        log.warning("Batched VJP failed (%s); falling back to one backward per code", err)
        return torch.stack(
            [torch.autograd.grad(total, wrt, grad_outputs=e, retain_graph=True)[0] for e in eye]
        )


def attribution_effects(
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
    chunk: int = 64,
    progress: bool = True,
) -> Effects:
    """A[i, j] (and the control along the same random directions `exact` uses) from gradients."""
    t0 = time.perf_counter()
    intervention, up, down, dirs = setup_effects(
        segment, cleans, upstream, downstream, intervention, upstream_ids, downstream_ids
    )
    d_up = dirs[up]
    r_up = random_directions(dirs, seed)[up] if control else None
    effect = torch.zeros(len(up), len(down), dtype=torch.float64)
    ctrl = torch.zeros_like(effect) if control else None
    n_meas = sum(int(c.measure.sum()) for c in cleans)
    bar = tqdm(
        total=len(cleans) * ((len(down) + chunk - 1) // chunk),
        desc=f"attribution {segment.h1.name}->{segment.h2.name}",
        unit="vjp",
        disable=not progress,
    )
    for clean in cleans:
        with torch.no_grad():
            c = coefficients(intervention, upstream, clean)[:, up]  # [pos, n_up]
        zero = torch.zeros(1, *clean.x1.shape, requires_grad=True)
        with torch.enable_grad():
            x2 = segment.run(clean, zero, routes)
            total = downstream.encode(x2[0, clean.measure])[..., down].sum(dim=0)  # [n_down]
            if not total.requires_grad:
                raise PatchSetupError(
                    "The downstream codes do not depend differentiably on h1 (is the downstream "
                    f"basis's encode under no_grad, like NMF's?); use method=exact. ({type(downstream).__name__})"
                )
            for rows in torch.arange(len(down)).split(chunk):
                g = _vjps(total, zero, rows)[:, 0]  # [k, pos, d_model]
                effect[:, rows] += torch.einsum("tn,ktn->nk", c, g @ d_up.T).double()
                if control:
                    ctrl[:, rows] += torch.einsum("tn,ktn->nk", c, g @ r_up.T).double()
                bar.update(1)
    bar.close()
    return Effects(
        effect=(effect / n_meas).float(),
        control=None if ctrl is None else (ctrl / n_meas).float(),
        upstream=up,
        downstream=down,
        method="attribution",
        intervention=describe_intervention(intervention),
        n_positions=n_meas,
        seconds=time.perf_counter() - t0,
        routes=getattr(routes, "spec", "all"),
    )


def _top(x: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries, ties broken by position (a stable sort, unlike topk).

    So equal values rank the same way in both matrices: in a bootstrap resample a duplicated
    upstream row is duplicated in exact and approx alike, and its copies enter both top-k sets
    first copy first, which makes the overlap the multiset overlap of pairs.
    """
    return torch.sort(x, descending=True, stable=True).indices[:k]


def agreement(
    exact: Annotated[Tensor, "n_up n_down"] | Effects,
    approx: Annotated[Tensor, "n_up n_down"] | Effects,
    k: int = 200,
) -> dict[str, float]:
    """How well approx ranks the pairs exact ranks: Spearman (all pairs, and the k strongest exact
    pairs), Pearson, top-k overlap by |effect|, sign agreement (all nonzero pairs, and top k)."""
    e = (exact.effect if isinstance(exact, Effects) else exact).flatten().double()
    a = (approx.effect if isinstance(approx, Effects) else approx).flatten().double()
    if e.shape != a.shape:
        raise ValueError(f"Effect matrices differ in shape: {tuple(e.shape)} vs {tuple(a.shape)}")
    k = max(1, min(int(k), len(e)))
    top_e, top_a = _top(e.abs(), k), _top(a.abs(), k)
    nonzero = e != 0
    both = len(e) > 1 and float(e.std()) > 0 and float(a.std()) > 0
    top_ok = k > 1 and float(e[top_e].std()) > 0 and float(a[top_e].std()) > 0
    return {
        "n_pairs": len(e),
        "spearman": float(spearman_corrcoef(a, e)) if both else float("nan"),
        "pearson": float(pearson_corrcoef(a, e)) if both else float("nan"),
        "spearman_topk": float(spearman_corrcoef(a[top_e], e[top_e])) if top_ok else float("nan"),
        "topk": k,
        "topk_overlap": len(set(top_e.tolist()) & set(top_a.tolist())) / k,
        "sign_agreement": float((torch.sign(a[nonzero]) == torch.sign(e[nonzero])).double().mean())
        if nonzero.any()
        else float("nan"),
        "sign_agreement_topk": float(
            (torch.sign(a[top_e]) == torch.sign(e[top_e])).double().mean()
        ),
    }


AGREEMENT_STATS = (
    "spearman",
    "pearson",
    "spearman_topk",
    "topk_overlap",
    "sign_agreement",
    "sign_agreement_topk",
)


def agreement_bootstrap(
    exact: Annotated[Tensor, "n_up n_down"] | Effects,
    approx: Annotated[Tensor, "n_up n_down"] | Effects,
    k: int = 200,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """`agreement(exact, approx, k)` with percentile bootstrap intervals over upstream features.

    The items are the upstream features (rows): each is its own intervention, independent of the
    others, while the downstream codes of one row come from the same rerun and are not. A
    resample draws n_up rows with replacement (`stats.bootstrap_indices`, seeded: the same seed
    and n_up give the same resamples, so two comparisons over the same rows are paired) and
    recomputes every statistic on the resampled [n_up, n_down] matrices.

    Top-k on a resample: recomputed with the same k. A resample has exactly as many pairs as the
    data (n_up rows of n_down), so "k scaled to the resample's size" is this same k. The other
    option, keeping the original top-k pairs fixed, is not well defined: a resample may lack
    some of those pairs or hold them twice. Duplicated rows enter both top-k sets the same way
    (`_top` breaks ties by position), so the overlap counts each copy at most once on each side.

    Returns {"point": agreement(...), "ci": {stat: [lo, hi]}, "replicates": {stat: [n_boot]}
    (NaN where undefined on a resample, dropped from the interval), "n_upstream", "n_downstream",
    "n_boot", "seed", "level"}.
    """
    e = exact.effect if isinstance(exact, Effects) else exact
    a = approx.effect if isinstance(approx, Effects) else approx
    if e.shape != a.shape or e.ndim != 2:
        raise ValueError(
            f"Need two [n_up, n_down] matrices of one shape, got {tuple(e.shape)} and {tuple(a.shape)}"
        )
    e, a = e.detach().double(), a.detach().double()
    point = agreement(e, a, k)
    reps = {s: torch.empty(int(n_boot), dtype=torch.float64) for s in AGREEMENT_STATS}
    for b, rows in enumerate(bootstrap_indices(len(e), n_boot, seed)):
        one = agreement(e[rows], a[rows], k)
        for s in AGREEMENT_STATS:
            reps[s][b] = one[s]
    return {
        "point": point,
        "ci": {s: list(percentile_interval(r, level)) for s, r in reps.items()},
        "replicates": reps,
        "n_upstream": int(e.shape[0]),
        "n_downstream": int(e.shape[1]),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "level": float(level),
    }
