"""Lock metrics: torchmetrics objects that accumulate over batches, and the lock decision.

Owns partner retrieval and equivariance (relation preservation) as torchmetrics over a whole
held-out set, drift of the map's parameters between epochs, and the `LockCriterion` that turns
paired, bootstrapped evidence (from `analoglock.lock.evaluate`) into "the map has locked".
Every metric state has a `dist_reduce_fx`, so values are the same under DDP as on one device.
Knows nothing of maps, models or how activations were harvested; the loss math it shares
lives in `analoglock.lock.losses`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from analoglock.lock.losses import check_paired
from analoglock.stats import EPS, as_rows, centred_sum_sq

logger = logging.getLogger(__name__)


def retrieval_topk(
    mapped_a: Tensor, b: Tensor, ks: Sequence[int] = (1, 5), chunk_size: int = 4096
) -> dict[str, Tensor]:
    """Fraction of rows whose partner b_i is among the top k of all b rows by cosine to M(a_i).

    Returns {"top1": ..., "top5": ...} for ks=(1, 5). Ties are broken at random in expectation
    (a row whose partner ties with t others at rank r counts (k - r) / (t + 1), clipped to
    [0, 1]): a collapsed map that sends everything to one point scores chance, k / n, rather
    than 1. Rows are scored `chunk_size` at a time so memory stays O(chunk_size * n).
    """
    check_paired(mapped_a, b)
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    n = len(b)
    a_unit = F.normalize(mapped_a.detach().float(), dim=-1)
    b_unit = F.normalize(b.detach().float(), dim=-1)
    hits = {int(k): torch.zeros((), dtype=torch.float64, device=b.device) for k in ks}
    for start in range(0, n, chunk_size):
        sims = a_unit[start : start + chunk_size] @ b_unit.T  # (chunk, n): candidates = all b
        rows = torch.arange(len(sims), device=b.device)
        own = sims[rows, rows + start].unsqueeze(1)  # each row's similarity to its true partner
        better = (sims > own).sum(dim=1)
        ties = (sims == own).sum(dim=1) - 1  # other candidates scoring exactly like the partner
        for k in hits:
            hits[k] += ((k - better) / (ties + 1)).clamp(0, 1).sum()
    return {f"top{k}": hit / n for k, hit in hits.items()}


class PartnerRetrieval(Metric):
    """Top-k partner retrieval over a whole held-out set, row i of A paired with row i of B.

    The candidates for each row are all B rows of the set, not only the batch, so rows are kept
    (cat states) and scored in `compute`. `compute` returns {"top1": ..., "top5": ...}; log it
    with `log_dict`; the value `forward` returns per batch ranks within that batch only. Under
    DDP, avoid a sampler that pads with repeated rows: a repeated partner is a tie and halves
    that row's top-1.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    mapped_a: list[Tensor]
    b: list[Tensor]

    def __init__(self, k: Sequence[int] = (1, 5), **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = tuple(int(x) for x in k)
        self.add_state("mapped_a", default=[], dist_reduce_fx="cat")
        self.add_state("b", default=[], dist_reduce_fx="cat")

    def update(self, mapped_a: Tensor, b: Tensor) -> None:
        """Keep a batch of paired rows."""
        check_paired(mapped_a, b)
        self.mapped_a.append(mapped_a.detach())
        self.b.append(b.detach())

    def compute(self) -> dict[str, Tensor]:
        """Top-k retrieval over every row seen."""
        # After a DDP sync the list state arrives already concatenated into one tensor.
        empty = len(self.b) == 0 if isinstance(self.b, list) else self.b.numel() == 0
        if empty:
            raise RuntimeError("PartnerRetrieval.compute() before any update()")
        return retrieval_topk(dim_zero_cat(self.mapped_a), dim_zero_cat(self.b), self.k)


class EquivarianceError(Metric):
    """`losses.relation_preservation` over all pairs of the whole set, accumulated by batches.

    The all-pairs value only needs sums (see `relation_preservation`), so states are float64
    running sums, not rows: exact, O(d) memory, and summed across DDP ranks. Vector sums start
    as a scalar 0 that broadcasts to (d,) on the first update, so d need not be given; under
    DDP every rank must see at least one batch.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    n: Tensor
    sum_u: Tensor
    sum_sq_u: Tensor
    sum_b: Tensor
    sum_sq_b: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("n", "sum_u", "sum_sq_u", "sum_b", "sum_sq_b"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mapped_a: Tensor, b: Tensor) -> None:
        """Add a batch of paired rows to the running sums."""
        check_paired(mapped_a, b)
        b_rows = as_rows(b)
        u = as_rows(mapped_a) - b_rows  # pair (i, j)'s relation error is u_i - u_j
        self.n = self.n + len(b_rows)
        self.sum_u = self.sum_u + u.sum(dim=0)  # out of place: the scalar 0 broadcasts to (d,)
        self.sum_sq_u = self.sum_sq_u + u.pow(2).sum()
        self.sum_b = self.sum_b + b_rows.sum(dim=0)
        self.sum_sq_b = self.sum_sq_b + b_rows.pow(2).sum()

    def compute(self) -> Tensor:
        """Relation error over all pairs seen, normalised by the spread of B's relations."""
        if self.n < 2:
            raise RuntimeError("EquivarianceError needs at least 2 rows before compute()")
        err = centred_sum_sq(self.sum_u, self.sum_sq_u, self.n)
        scale = centred_sum_sq(self.sum_b, self.sum_sq_b, self.n)
        return err / scale.clamp_min(EPS)


class MapDrift(Metric):
    """Relative change of the map's parameters since the previous update: ||p_t - p_{t-1}|| / ||p_{t-1}||.

    Call `update(torch.nn.utils.parameters_to_vector(map.parameters()))` once per epoch, then
    `compute()`; the first value is inf (nothing to compare with). Holds the last two vectors,
    so never let it be reset between epochs (log the computed value, not the object) and do
    not call it as a function (`forward` scores a lone update, which is always inf). States are
    not checkpointed: after a resume the first value is inf again, which `LockCriterion` treats
    as failing, so patience restarts.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = True
    previous: Tensor
    current: Tensor

    def __init__(self, eps: float = EPS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        # Under DDP the parameters are identical on every rank, so "mean" leaves them unchanged.
        for name in ("previous", "current"):
            self.add_state(name, default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="mean")

    def update(self, params: Tensor) -> None:
        """Record this epoch's parameter vector (any shape; it is flattened)."""
        flat = params.detach().reshape(-1).to(torch.float64).clone()
        if self.current.numel() and flat.numel() != self.current.numel():
            raise ValueError(
                f"parameter count changed from {self.current.numel()} to {flat.numel()}; "
                "use one MapDrift per map"
            )
        self.previous, self.current = self.current, flat

    def compute(self) -> Tensor:
        """Relative change between the last two updates; inf before there are two."""
        if self.previous.numel() == 0:
            return torch.tensor(math.inf, dtype=torch.float64, device=self.current.device)
        return (self.current - self.previous).norm() / (self.previous.norm() + self.eps)


@dataclass
class LockCriterion:
    """Decides when the map has locked: every clause holds on validation for `patience` epochs.

    The clauses, each on held-out validation pairs and paired item by item:
    - retrieval: for each view in `views` (story-level and role-level pairs, or "assign": a
      role's partner among its own pair's roles, which translations cannot change) and each baseline in
      `baselines` (identity, mean difference, Procrustes), the lower end of the bootstrap 95%
      interval of (learned - baseline) top-1 exceeds `min_margin`. A map that only learns the
      domain shift ties the mean difference and never locks;
    - relations: for each view, the upper end of the interval of (learned - identity) relation
      error is below 0 (the map carries within-domain relations across better than doing
      nothing). For maps that cannot change relation errors (translations) this clause is
      reported as not applicable (None), never silently passed: such a map can lock only on
      retrieval, and `not_applicable` says so in the history;
    - drift: the map's parameters moved less than `max_drift` (relative) since the last epoch,
      so the clauses describe a fixed map rather than one passing through a good region.
    `update` returns whether the map is locked now; a failing epoch ends the streak and the lock.
    """

    views: tuple[str, ...] = ("story", "roles")
    baselines: tuple[str, ...] = ("identity", "meandiff", "procrustes")
    min_margin: float = 0.0
    relation_test: bool = True
    max_drift: float = 0.02
    patience: int = 3
    epoch: int = field(default=-1, init=False)  # index of the last update; -1 before any
    streak: int = field(default=0, init=False)  # consecutive passing epochs, ending at `epoch`
    lock_epoch: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.views, self.baselines = tuple(self.views), tuple(self.baselines)
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {self.patience}")
        if self.max_drift < 0:
            raise ValueError(f"max_drift must be >= 0, got {self.max_drift}")
        if not self.views:
            raise ValueError("views is empty: name at least one of story, roles, mentions, assign")

    @property
    def locked(self) -> bool:
        """Whether the map is locked as of the last update."""
        return self.lock_epoch is not None

    def clauses(
        self, margins: dict[str, list[float]], drift: float, relations_apply: bool = True
    ) -> dict[str, bool | None]:
        """Each clause's verdict: True, False, or None where it does not apply."""
        out: dict[str, bool | None] = {}
        for v in self.views:
            for name in self.baselines:
                m = margins.get(f"top1_{v}_vs_{name}")
                out[f"top1_{v}_vs_{name}"] = m is not None and m[1] > self.min_margin
            if self.relation_test and v != "assign":  # within-pair ranks have no relation error
                m = margins.get(f"rel_err_{v}_vs_identity")
                out[f"rel_err_{v}_vs_identity"] = (
                    None if not relations_apply else (m is not None and m[2] < 0)
                )
        out["drift"] = math.isfinite(float(drift)) and float(drift) <= self.max_drift
        return out

    def update(
        self, margins: dict[str, list[float]], drift: float, relations_apply: bool = True
    ) -> bool:
        """Record one epoch's evidence; return whether the map is locked now."""
        self.epoch += 1
        verdicts = self.clauses(margins, drift, relations_apply)
        if all(v is not False for v in verdicts.values()):
            self.streak += 1
            if self.streak >= self.patience and self.lock_epoch is None:
                self.lock_epoch = self.epoch
                logger.info("map locked at epoch %d (%d passing epochs)", self.epoch, self.streak)
        else:
            if self.lock_epoch is not None:
                logger.warning(
                    "map lost its lock at epoch %d (locked at %d)", self.epoch, self.lock_epoch
                )
            self.streak, self.lock_epoch = 0, None
        return self.locked

    def reset(self) -> None:
        """Forget every epoch seen (e.g. before a new run)."""
        self.epoch, self.streak, self.lock_epoch = -1, 0, None
