"""Concept vectors from labelled rows, and how well they separate held-out rows.

Owns the mean difference, a linear probe's direction (a small deterministic softmax regression fit
by LBFGS in torch) and the top singular direction of paired differences, each with its held-out
accuracy beside two nulls: the same fit with class labels shuffled, and random directions of both
kinds (isotropic, and drawn from the covariance of the train rows). Knows nothing of how the rows
were harvested (concepts.py) or which analysis uses the vectors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.relations.concepts import HELDOUT
from analoglock.relations.context import ConceptActs
from analoglock.stats import NULL_KINDS, NULL_WHAT, empirical_p, null_directions


@contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny solves on one thread: on a shared CPU, thread hand-offs cost more than the math."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Probe:
    """Softmax regression on standardised inputs; `direction(a, b)` maps back to activation space."""

    weight: Annotated[Tensor, "n_classes d_model"]
    bias: Annotated[Tensor, "n_classes"]
    mean: Annotated[Tensor, "d_model"]
    std: Annotated[Tensor, "d_model"]

    def logits(self, x: Annotated[Tensor, "n d_model"]) -> Annotated[Tensor, "n n_classes"]:
        """Class logits."""
        return ((x.double() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, x: Tensor) -> Tensor:
        """Predicted class index."""
        return self.logits(x).argmax(-1)

    def direction(self, a: int = 1, b: int = 0) -> Annotated[Tensor, "d_model"]:
        """The activation-space direction that raises logit a over logit b (unit norm)."""
        w = (self.weight[a] - self.weight[b]) / self.std
        return (w / w.norm()).float()


def fit_probe(
    x: Annotated[Tensor, "n d_model"],
    y: Annotated[Tensor, "n"],
    n_classes: int | None = None,
    l2: float = 1e-2,
    steps: int = 200,
) -> Probe:
    """L2-regularised softmax regression by full-batch LBFGS in float64 (deterministic)."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"fit_probe needs matching non-empty x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    k = int(n_classes or int(y.max()) + 1)
    if len(torch.unique(y)) < 2:
        raise ValueError("fit_probe needs at least two classes in y")
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + l2 * w.pow(2).sum() / 2
        loss.backward()
        return loss

    with torch.enable_grad(), single_thread():
        opt.step(closure)
    return Probe(w.detach(), b.detach(), mean, std)


def balanced_accuracy(pred: Tensor, y: Tensor) -> float:
    """Mean over classes of per-class accuracy (chance is 1 / n_classes whatever the sizes)."""
    accs = [(pred[y == c] == c).double().mean() for c in torch.unique(y)]
    return float(torch.stack(accs).mean())


def projection_accuracy(
    direction: Tensor, x_tr: Tensor, y_tr: Tensor, x_te: Tensor, y_te: Tensor
) -> float:
    """Held-out balanced accuracy of thresholding the projection at the train class means' midpoint."""
    d = direction.double()
    p_tr, p_te = x_tr.double() @ d, x_te.double() @ d
    m1, m0 = p_tr[y_tr == 1].mean(), p_tr[y_tr == 0].mean()
    pred = ((p_te > (m0 + m1) / 2) == bool(m1 > m0)).long()
    return balanced_accuracy(pred, y_te)


def top_singular_direction(diffs: Annotated[Tensor, "n d_model"]) -> Annotated[Tensor, "d_model"]:
    """Top right singular vector of (uncentred) paired differences, signed along their mean."""
    _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    v = vh[0]
    return (v if float(v @ diffs.double().mean(0)) >= 0 else -v).float()


def contrast_rows(
    ca: ConceptActs, hook: str, pos: str, neg: str | Sequence[str] | None = None
) -> tuple[Tensor, Tensor]:
    """Paired rows (positive [n, d], negative [n, d]): `pos` vs class `neg`, or the item-wise mean
    of several classes (`neg` a list, or None for every other class)."""
    xp = ca.class_acts(hook, pos)
    if isinstance(neg, str):
        return xp, ca.class_acts(hook, neg)
    rest = [c for c in ca.classes if c != pos] if neg is None else list(neg)
    if not rest or pos in rest:
        raise ValueError(f"{ca.name}: contrast {pos!r} vs {rest} needs other classes")
    return xp, torch.stack([ca.class_acts(hook, c) for c in rest]).mean(0)


def contrast_name(pos: str, neg: str | Sequence[str] | None) -> str:
    """Readable name of a contrast: "male-female", "lion-rest", "lion-(tiger+bear)"."""
    if neg is None:
        return f"{pos}-rest"
    return f"{pos}-{neg}" if isinstance(neg, str) else f"{pos}-({'+'.join(neg)})"


METHODS = ("mean_diff", "probe", "svd")


def _method_vectors(
    dp: Tensor, dn: Tensor, probe_steps: int, methods: Sequence[str] = METHODS
) -> dict[str, Tensor]:
    """Mean difference, probe direction and top singular direction from paired train rows."""
    out = {}
    if "mean_diff" in methods:
        out["mean_diff"] = (dp.double().mean(0) - dn.double().mean(0)).float()
    if "probe" in methods:
        x = torch.cat([dp, dn])
        y = torch.cat([torch.ones(len(dp)), torch.zeros(len(dn))]).long()
        out["probe"] = fit_probe(x, y, 2, steps=probe_steps).direction(1, 0)
    if "svd" in methods:
        out["svd"] = top_singular_direction(dp - dn)
    return out


def concept_vectors(
    ca: ConceptActs,
    hook: str,
    pos: str,
    neg: str | Sequence[str] | None = None,
    n_null: int = 50,
    seed: int = 0,
    probe_steps: int = 100,
    methods: Sequence[str] = METHODS,
    n_random: int = 200,
) -> dict:
    """Concept vectors for `pos` vs `neg` (or vs the other classes) with held-out accuracy and controls.

    Train rows come from the train split, accuracy from the held-out splits (validation + test).
    Nulls: the same fit and score with class labels shuffled across rows (train and held-out
    separately, n_null times), and `n_random` random directions of each kind (`p_random`:
    isotropic; `p_random_covariance`: drawn from the train rows' covariance). Returns numbers,
    plus tensors under "_vectors" and the raw shuffled-label accuracies under "_null".
    """
    xp, xn = contrast_rows(ca, hook, pos, neg)
    tr, te = ca.split_mask("train"), ca.split_mask(*HELDOUT)
    if not tr.any() or not te.any():
        raise ValueError(f"{ca.name}: need train and held-out items at {hook}")
    gen = torch.Generator().manual_seed(seed)
    x_te = torch.cat([xp[te], xn[te]])
    y_te = torch.cat([torch.ones(int(te.sum())), torch.zeros(int(te.sum()))]).long()
    x_tr = torch.cat([xp[tr], xn[tr]])
    y_tr = torch.cat([torch.ones(int(tr.sum())), torch.zeros(int(tr.sum()))]).long()
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    vecs = _method_vectors(xp[tr], xn[tr], probe_steps, methods)
    accs = {m: projection_accuracy(v, x_tr, y_tr, x_te, y_te) for m, v in vecs.items()}
    null = {m: [] for m in vecs}
    n_tr = int(tr.sum())
    for _ in tqdm(range(n_null), desc=f"null {ca.name}:{pos}", leave=False, disable=n_null < 20):
        # Labels shuffled across rows, in train and in held-out alike (Ojala & Garriga's test):
        # the refit direction is then scored against labels that carry no information either.
        sh_tr = x_tr[torch.randperm(len(x_tr), generator=gen)]
        sh_te = x_te[torch.randperm(len(x_te), generator=gen)]
        for m, v in _method_vectors(sh_tr[:n_tr], sh_tr[n_tr:], probe_steps, methods).items():
            null[m].append(projection_accuracy(v, sh_tr, y_tr, sh_te, y_te))
    rand = {  # random directions of each kind, scored like the concept vectors
        kind: torch.tensor(
            [
                projection_accuracy(r.float(), x_tr, y_tr, x_te, y_te)
                for r in null_directions(kind, n_random, x_tr, gen)
            ]
        )
        for kind in NULL_KINDS
    }
    methods = {}
    for m, v in vecs.items():
        nl = torch.tensor(null[m]) if null[m] else torch.empty(0)
        methods[m] = {
            "heldout_accuracy": accs[m],
            "norm": float(v.norm()),
            "shuffled_labels": _summary(nl),
            "p_shuffled": empirical_p(accs[m], nl) if len(nl) else None,
            "random_direction": _summary(rand["isotropic"]),
            "p_random": empirical_p(accs[m], rand["isotropic"]),
            "random_direction_covariance": _summary(rand["covariance"]),
            "p_random_covariance": empirical_p(accs[m], rand["covariance"]),
        }
    unit = {m: v / v.norm() for m, v in vecs.items()}
    agreement = {
        f"{a}~{b}": float(unit[a] @ unit[b])
        for i, a in enumerate(unit)
        for b in list(unit)[i + 1 :]
    }
    return {
        "set": ca.name,
        "hook": hook,
        "contrast": contrast_name(pos, neg),
        "n_train": int(tr.sum()),
        "n_heldout": int(te.sum()),
        "chance": 0.5,
        "random_directions": {k: NULL_WHAT[k] for k in NULL_KINDS},
        "methods": methods,
        "cosine_between_methods": agreement,
        "_vectors": vecs,  # "_" keys are tensors for callers; the JSON writer drops them
        "_null": {m: torch.tensor(v) for m, v in null.items()},
    }


def _summary(x: Tensor) -> dict[str, float | int]:
    """Mean, sd, 95th percentile and n of a null sample."""
    if x.numel() == 0:
        return {"n": 0}
    x = x.double()
    return {
        "mean": float(x.mean()),
        "sd": float(x.std()) if x.numel() > 1 else 0.0,
        "q95": float(torch.quantile(x, 0.95)),
        "n": int(x.numel()),
    }
