"""Relation operators from a subject state h to the last-layer state z, and the edits they imply.

Owns the math, on tensors only: the linear relational embedding (LRE: z = beta W h + b with W the
mean Jacobian, optionally truncated to rank k, and its low-rank pseudo-inverse for edits) and the
baselines it is compared with, each fit on the same few train pairs (H, Z): identity, translation
(mean offset), least-squares linear regression, analoglock's mean-difference relation vector, and
a learned lock map (`analoglock.lock.maps.LowRankMap` trained with the lock's losses). Column
convention throughout: z = W h + b, W is [d_out, d_in], batches are rows (h @ W.T). Knows nothing
of models, prompts or tokens (see lre.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from analoglock.lock.losses import cosine_matching, info_nce, relation_preservation, total_loss
from analoglock.lock.maps import LowRankMap
from analoglock.lock.maps.baselines import mean_difference

BASELINES = ("identity", "translation", "linreg", "meandiff", "lock")
LOCK_WEIGHTS = {"match": 1.0, "infonce": 1.0, "relation": 0.5}  # the lock's default loss weights


def low_rank_pinv_apply(
    U: Annotated[Tensor, "d_out r"],
    S: Annotated[Tensor, "r"],
    V: Annotated[Tensor, "d_in r"],
    dz: Annotated[Tensor, "n d_out"],
    rank: int | None = None,
    rtol: float = 1e-6,
) -> Annotated[Tensor, "n d_in"]:
    """dz mapped through the rank-`rank` pseudo-inverse of U diag(S) V^T (rows in, rows out);
    singular values below rtol * S.max() are dropped (they would blow the edit up)."""
    k = len(S) if rank is None else min(int(rank), len(S))
    U, S, V = U[:, :k], S[:k], V[:, :k]
    keep = rtol * S.max().clamp_min(1e-30) < S
    return ((dz @ U[:, keep]) / S[keep]) @ V[:, keep].T


@dataclass
class AffineOperator:
    """z = W h + b (W None: the identity); `edit` maps a wanted change of z to a change of h."""

    name: str
    b: Annotated[Tensor, "d_model"]
    W: Annotated[Tensor, "d_model d_model"] | None = None

    def __call__(self, h: Annotated[Tensor, "n d_model"]) -> Annotated[Tensor, "n d_model"]:
        """The predicted last-layer states of subject states `h`."""
        return (h if self.W is None else h @ self.W.T) + self.b

    def edit(self, dz: Annotated[Tensor, "n d_model"], rank: int | None = None) -> Tensor:
        """Delta h = pinv(W) dz (truncated to `rank` singular directions when given)."""
        if self.W is None:
            return dz.clone()
        U, S, Vh = torch.linalg.svd(self.W.double(), full_matrices=False)
        return low_rank_pinv_apply(U, S, Vh.T, dz.double(), rank).to(dz.dtype)


@dataclass
class LinearRelation:
    """The LRE of one relation at one layer: z = beta W h + b with W = U diag(S) V^T, the SVD of
    the mean Jacobian, kept whole so any rank can be read off it."""

    U: Annotated[Tensor, "d_model r"]
    S: Annotated[Tensor, "r"]
    V: Annotated[Tensor, "d_model r"]
    b: Annotated[Tensor, "d_model"]
    beta: float = 1.0

    @property
    def rank(self) -> int:
        """Singular directions held (d_model)."""
        return len(self.S)

    @property
    def weight(self) -> Annotated[Tensor, "d_model d_model"]:
        """W (rank `self.rank`)."""
        return (self.U * self.S) @ self.V.T

    def __call__(self, h: Annotated[Tensor, "n d_model"], rank: int | None = None) -> Tensor:
        """beta W_k h + b with W truncated to its top `rank` singular directions."""
        k = self.rank if rank is None else min(int(rank), self.rank)
        wh = ((h @ self.V[:, :k]) * self.S[:k]) @ self.U[:, :k].T
        return self.beta * wh + self.b

    def edit(self, dz: Annotated[Tensor, "n d_model"], rank: int | None = None) -> Tensor:
        """Delta h = W_k^+ dz, the paper's low-rank pseudo-inverse edit (beta not applied: the
        Jacobian is the local slope; beta only corrects the offset of the affine fit)."""
        return low_rank_pinv_apply(self.U, self.S, self.V, dz, rank)


def lre_from_weight(
    W: Annotated[Tensor, "d_model d_model"], b: Tensor, beta: float
) -> LinearRelation:
    """An exact LinearRelation from the mean Jacobian W (full SVD, float64 for the small values)."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return LinearRelation(U.float(), S.float(), Vh.T.float(), b.float(), beta)


# ---------------------------------------------------------------- baselines


def linear_regression(
    H: Annotated[Tensor, "n d_model"], Z: Annotated[Tensor, "n d_model"]
) -> AffineOperator:
    """Least squares z = W h + b on the train pairs (minimum-norm W when n <= d_model)."""
    Hd, Zd = H.double(), Z.double()
    mu_h, mu_z = Hd.mean(0), Zd.mean(0)
    Wt = torch.linalg.pinv(Hd - mu_h) @ (Zd - mu_z)  # [d_in, d_out], rank <= n - 1
    return AffineOperator("linreg", (mu_z - mu_h @ Wt).float(), Wt.T.float())


def fit_lock_map(
    H: Annotated[Tensor, "n d_model"],
    Z: Annotated[Tensor, "n d_model"],
    rank: int = 8,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> AffineOperator:
    """A `LowRankMap` (z = h + U V^T h + b) trained on the pairs with the lock's losses
    (cosine matching, InfoNCE, relation preservation, default weights), started at the
    translation; returned as the AffineOperator W = I + U V^T."""
    d = H.shape[1]
    m = LowRankMap(d_model=d, rank=max(1, min(rank, d)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # V redrawn from our own generator (the class uses the global one)
        m.V.copy_(torch.randn(m.V.shape, generator=gen) * m.init_scale)
        m.b_map.copy_(mean_difference(H, Z))
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    H, Z = H.detach().float(), Z.detach().float()
    with torch.enable_grad():
        for _ in range(steps):
            out = m(H)
            terms = {
                "match": cosine_matching(out, Z),
                "infonce": info_nce(out, Z, temperature=0.1),
                "relation": relation_preservation(out, Z),
            }
            loss, _ = total_loss(terms, LOCK_WEIGHTS)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        W = torch.eye(d) + m.U @ m.V.T
        return AffineOperator("lock", m.b_map.detach().clone(), W)


def fit_baselines(
    H: Annotated[Tensor, "n d_model"],
    Z: Annotated[Tensor, "n d_model"],
    lock_rank: int = 8,
    lock_steps: int = 300,
    seed: int = 0,
) -> dict[str, AffineOperator]:
    """Every baseline fit on the train pairs (H[i], Z[i]), by name (BASELINES order)."""
    H, Z = H.float(), Z.float()
    return {
        "identity": AffineOperator("identity", torch.zeros(H.shape[1])),
        "translation": AffineOperator("translation", (Z - H).mean(0)),
        "linreg": linear_regression(H, Z),
        # analoglock's relation vector: the difference of the two classes' means (unpaired rows)
        "meandiff": AffineOperator("meandiff", mean_difference(H, Z)),
        "lock": fit_lock_map(H, Z, rank=lock_rank, steps=lock_steps, seed=seed),
    }


def class_mean_edit(
    H_pool: Annotated[Tensor, "m d_model"],
    obj_pool: Tensor,
    h_src: Annotated[Tensor, "n d_model"],
    obj_src: Tensor,
    h_tgt: Annotated[Tensor, "n d_model"],
    obj_tgt: Tensor,
) -> Annotated[Tensor, "n d_model"]:
    """analoglock's relation vector between two objects at the subject layer: the mean subject
    state of the target object's class minus that of the source's, each class being the pool's
    rows with that object plus the sample itself (so a class seen once is that sample's state)."""
    out = []
    for hs, os_, ht, ot in zip(h_src, obj_src.tolist(), h_tgt, obj_tgt.tolist(), strict=True):
        mu_t = torch.cat([H_pool[obj_pool == ot], ht[None]]).mean(0)
        mu_s = torch.cat([H_pool[obj_pool == os_], hs[None]]).mean(0)
        out.append(mu_t - mu_s)
    return torch.stack(out) if out else h_src.new_zeros(0, h_src.shape[1])


def same_norm_random(
    deltas: Annotated[Tensor, "n d_model"], gen: torch.Generator
) -> Annotated[Tensor, "n d_model"]:
    """Isotropic random directions, each with the norm of the matching row of `deltas`."""
    r = torch.randn(deltas.shape, generator=gen)
    return r / r.norm(dim=-1, keepdim=True) * deltas.norm(dim=-1, keepdim=True)
