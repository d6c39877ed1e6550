"""Steering vectors from matched rows: one plain function per aggregator.

Owns how positive rows and their matched negative rows (row i of each is the same item) become
one [d_model] vector: the mean difference; the first principal component of the paired
differences, signed along the mean difference; and a logistic probe's direction (L2-regularised,
`vectors.fit_probe`). The last two are unit directions rescaled to the mean difference's norm, so
one scale is one size of push for every aggregator. The fourth aggregator, the lock, is a learned
map steered from a lock run (`analoglock-steer ckpt=`), not a function of rows. Knows nothing of
models, hooks or where the rows came from (`contrast`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Annotated

import torch
from torch import Tensor

from analoglock.relations.vectors import Probe, fit_probe

Rows = Annotated[Tensor, "n d_model"]
Vector = Annotated[Tensor, "d_model"]

PROBE_L2 = 1e-2  # on standardised inputs, as relations' separability probes are fit
LOCK = "lock"  # steered from a lock run (ckpt=), never aggregated from rows


def _paired(pos: Rows, neg: Rows) -> tuple[Tensor, Tensor]:
    """The two row sets in float64, refused unless they are matched [n, d] pairs (n >= 2)."""
    if pos.ndim != 2 or pos.shape != neg.shape:
        raise ValueError(
            f"positive rows {tuple(pos.shape)} and negative rows {tuple(neg.shape)} must be "
            "matched [n, d_model] pairs (row i of each is the same item)."
        )
    if len(pos) < 2:
        raise ValueError(f"an aggregator needs at least 2 pairs of rows, got {len(pos)}.")
    return pos.detach().double(), neg.detach().double()


def meandiff(pos: Rows, neg: Rows) -> Vector:
    """mean(positive) - mean(negative)."""
    p, n = _paired(pos, neg)
    return (p.mean(0) - n.mean(0)).float()


def first_pc(pos: Rows, neg: Rows) -> Vector:
    """Unit top right singular vector of the CENTRED paired differences, signed so that it agrees
    with the mean difference (a principal component has no sign of its own)."""
    p, n = _paired(pos, neg)
    d = p - n
    _, _, vh = torch.linalg.svd(d - d.mean(0), full_matrices=False)
    v = vh[0]
    return (v if float(v @ d.mean(0)) >= 0 else -v).float()


def pca_direction(pos: Rows, neg: Rows) -> Vector:
    """The first principal component of the paired differences at the mean difference's norm."""
    return first_pc(pos, neg) * meandiff(pos, neg).norm()


def contrast_probe(pos: Rows, neg: Rows, l2: float = PROBE_L2) -> Probe:
    """A logistic probe (two-class softmax regression, L2 on standardised inputs) that scores
    positive rows as class 1 and negative rows as class 0."""
    p, n = _paired(pos, neg)
    x = torch.cat([p, n])
    y = torch.cat([torch.ones(len(p)), torch.zeros(len(n))]).long()
    return fit_probe(x, y, 2, l2=float(l2))


def probe_scores(probe: Probe, x: Rows) -> Annotated[Tensor, "n"]:
    """P(positive | row) under a `contrast_probe`."""
    return torch.softmax(probe.logits(x), dim=-1)[:, 1].float()


def probe_direction(pos: Rows, neg: Rows, l2: float = PROBE_L2) -> Vector:
    """The probe's activation-space direction (raises the positive logit) at the mean
    difference's norm."""
    return contrast_probe(pos, neg, l2).direction(1, 0) * meandiff(pos, neg).norm()


AGGREGATORS: dict[str, Callable[..., Vector]] = {
    "meandiff": meandiff,
    "pca": pca_direction,
    "probe": probe_direction,
}


def check_aggregators(names: Sequence[str]) -> tuple[str, ...]:
    """The names, deduplicated in order; an unknown one is an error naming the valid ones."""
    names = tuple(dict.fromkeys(str(n) for n in names))
    if not names:
        raise ValueError(f"aggregator: give at least one of {', '.join(AGGREGATORS)}.")
    for name in names:
        if name == LOCK:
            raise ValueError(
                "aggregator=lock: the lock is a learned map, not a function of contrast rows; "
                "steer with it from its run directory: analoglock-steer ckpt=<lock run dir>."
            )
        if name not in AGGREGATORS:
            close = difflib.get_close_matches(name, list(AGGREGATORS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown aggregator {name!r}.{hint} Valid: {', '.join(AGGREGATORS)} "
                "(and the lock, through ckpt=)."
            )
    return names


def aggregate(name: str, pos: Rows, neg: Rows, probe_l2: float = PROBE_L2) -> Vector:
    """One aggregator's vector from matched rows."""
    (name,) = check_aggregators([name])
    if name == "probe":
        return probe_direction(pos, neg, probe_l2)
    return AGGREGATORS[name](pos, neg)


__all__ = [
    "AGGREGATORS",
    "aggregate",
    "check_aggregators",
    "contrast_probe",
    "first_pc",
    "meandiff",
    "pca_direction",
    "probe_direction",
    "probe_scores",
]
