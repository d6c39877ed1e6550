"""Concept search by shape: find directions or features that satisfy given geometric relations.

Owns a continuous score in [0, 1] per constraint type (the spec is in shape_spec.py), the
exhaustive (chunked) search over injective assignments of candidates to the spec's slots, and two
baselines: the best score found by the same search on random candidates (Gaussian vectors with
the candidates' own mean and covariance; codes permuted across inputs), which gives an empirical
p-value with floor 1 / (n_random + 1), and the score distribution of random tuples of the real
candidates. Knows nothing of models: candidates are vectors [n, d] (basis directions, class
means, ...) and/or codes [n_inputs, n] with one label per input.

Scores: parallelogram 1 - |(a-b)-(c-d)| / (|a-b| + |c-d|); orthogonal 1 - max |cos|; aligned
min |cos|; ordered the fraction of cross-group input pairs in the stated order (ties 1/2; "either"
takes the better direction). An assignment's score is the weighted mean over constraints.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor

from analoglock.relations.common import basis_at, svd_basis
from analoglock.relations.config import ShapeConfig, settings
from analoglock.relations.shape_spec import (
    Constraint,
    ShapeSpecError,
    _plain,
    parse_constraints,
    slot_order,
)
from analoglock.stats import EPS, empirical_p, p_floor

# ---------------------------------------------------------------- scores


def order_scores(
    codes: Annotated[Tensor, "n_inputs n"],
    labels: Sequence[str],
    order: Sequence[str],
    direction: str,
) -> Annotated[Tensor, "n"]:
    """Per candidate: fraction of (group i, group j > i) input pairs with code_i < code_j (ties 1/2)."""
    codes = codes.double()
    groups = [codes[[k for k, lab in enumerate(labels) if lab == g]] for g in order]
    num = torch.zeros(codes.shape[1], dtype=torch.float64)
    den = 0
    for i, j in itertools.combinations(range(len(groups)), 2):
        lo, hi = groups[i][:, None, :], groups[j][None, :, :]
        num += ((lo < hi).double() + 0.5 * (lo == hi).double()).sum((0, 1))
        den += len(groups[i]) * len(groups[j])
    up = num / max(den, 1)
    if direction == "increasing":
        return up
    if direction == "decreasing":
        return 1 - up
    return torch.maximum(up, 1 - up)


@dataclass
class _Tables:
    """Precomputed quantities the scorers index into."""

    gram: Tensor | None  # [n, n]
    fixed_cos: dict[str, Tensor]  # name -> [n]
    order: dict[int, Tensor]  # constraint index -> [n]


def _tables(
    constraints: Sequence[Constraint],
    vectors: Tensor | None,
    codes: Tensor | None,
    labels: Sequence[str] | None,
    fixed: Mapping[str, Tensor],
) -> _Tables:
    """Gram matrix, cosines to fixed vectors, order scores."""
    gram = None
    fixed_cos: dict[str, Tensor] = {}
    if any(c.type != "ordered" for c in constraints):
        if vectors is None:
            kinds = sorted({c.type for c in constraints if c.type != "ordered"})
            raise ShapeSpecError(
                f"constraints {kinds} need candidate vectors (pass vectors= or basis=)"
            )
        v = vectors.double()
        gram = v @ v.T
        unit = v / v.norm(dim=-1, keepdim=True).clamp_min(EPS)
        for name in {t for c in constraints for t in c.to}:
            if name in fixed:
                f = torch.as_tensor(fixed[name]).double().flatten()
                if f.shape[0] != v.shape[1]:
                    raise ShapeSpecError(
                        f"fixed vector {name!r} has width {f.shape[0]}, candidates have {v.shape[1]}"
                    )
                fixed_cos[name] = unit @ (f / f.norm().clamp_min(EPS))
    order = {}
    for i, c in enumerate(constraints):
        if c.type == "ordered":
            if codes is None:
                raise ShapeSpecError("ordered constraints need codes= [n_inputs, n] and labels=")
            order[i] = order_scores(codes, labels, c.order, c.direction)
    return _Tables(gram, fixed_cos, order)


def _abs_cos(g: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """|cos| between candidates a and b (broadcast index tensors)."""
    return g[a, b].abs() / (g[a, a] * g[b, b]).sqrt().clamp_min(EPS)


def _constraint_score(ci: int, c: Constraint, tab: _Tables, idx: Mapping[str, Tensor]) -> Tensor:
    """Score in [0, 1] of constraint `c` for broadcast candidate indices per slot."""
    if c.type == "ordered":
        return tab.order[ci][idx[c.slots[0]]]
    g = tab.gram
    if c.type == "parallelogram":
        a, b, cc, d = (idx[s] for s in c.slots)
        diff2 = (
            g[a, a]
            + g[b, b]
            + g[cc, cc]
            + g[d, d]
            - 2 * g[a, b]
            - 2 * g[a, cc]
            + 2 * g[a, d]
            + 2 * g[b, cc]
            - 2 * g[b, d]
            - 2 * g[cc, d]
        )
        n1 = (g[a, a] + g[b, b] - 2 * g[a, b]).clamp_min(0).sqrt()
        n2 = (g[cc, cc] + g[d, d] - 2 * g[cc, d]).clamp_min(0).sqrt()
        return 1 - diff2.clamp_min(0).sqrt() / (n1 + n2).clamp_min(EPS)
    cosines = [_abs_cos(g, idx[s], idx[t]) for s, t in itertools.combinations(c.slots, 2)]
    for s in c.slots:
        for t in c.to:
            cosines.append(
                _abs_cos(g, idx[s], idx[t]) if t in idx else tab.fixed_cos[t][idx[s]].abs()
            )
    stacked = torch.broadcast_tensors(*cosines)
    if c.type == "orthogonal":
        return 1 - torch.stack(stacked).max(0).values
    return torch.stack(stacked).min(0).values


def _total(constraints: Sequence[Constraint], tab: _Tables, idx: Mapping[str, Tensor]) -> Tensor:
    """Weighted mean of the constraint scores."""
    wsum = sum(c.weight for c in constraints)
    parts = [c.weight * _constraint_score(i, c, tab, idx) for i, c in enumerate(constraints)]
    return sum(torch.broadcast_tensors(*parts)) / wsum


def score_assignment(
    constraints: Sequence[Constraint], tab: _Tables, assignment: Mapping[str, int]
) -> dict[str, float]:
    """Total and per-constraint scores of one assignment slot -> candidate index."""
    idx = {s: torch.tensor(i) for s, i in assignment.items()}
    per = [float(_constraint_score(i, c, tab, idx)) for i, c in enumerate(constraints)]
    wsum = sum(c.weight for c in constraints)
    return {
        "total": sum(c.weight * p for c, p in zip(constraints, per, strict=True)) / wsum,
        "per": per,
    }


# ---------------------------------------------------------------- search


def _search(
    constraints: Sequence[Constraint], tab: _Tables, n: int, top_k: int, max_grid: int
) -> list[tuple[float, tuple[int, ...]]]:
    """Best injective assignments (score, candidate per slot), distinct candidate sets, best first."""
    slots = slot_order(constraints)
    k = len(slots)
    if n < k:
        raise ShapeSpecError(f"{k} slots need at least {k} candidates, got {n}")
    n_fixed = 0
    while n ** (k - n_fixed) > max_grid and n_fixed < k - 1:
        n_fixed += 1  # enumerate the first slots in Python, the rest as one tensor grid
    free = k - n_fixed
    grids = {
        s: torch.arange(n).reshape([n if j == d else 1 for j in range(free)])
        for d, s in enumerate(slots[n_fixed:])
    }
    keep = max(4 * top_k, top_k + 64)  # extra rows so deduplicating candidate sets leaves top_k
    heap: list[tuple[float, tuple[int, ...]]] = []
    for prefix in itertools.product(range(n), repeat=n_fixed):
        if len(set(prefix)) < n_fixed:
            continue
        idx = {s: torch.tensor(prefix[j]) for j, s in enumerate(slots[:n_fixed])} | grids
        total = _total(constraints, tab, idx).expand([n] * free).clone()
        for a, b in itertools.combinations(range(free), 2):  # distinct candidates per slot
            total.masked_fill_(grids[slots[n_fixed + a]] == grids[slots[n_fixed + b]], -math.inf)
        for j in prefix:
            for d in range(free):
                total.masked_fill_(grids[slots[n_fixed + d]] == j, -math.inf)
        flat = total.flatten()
        vals, pos = flat.topk(min(keep, flat.numel()))
        for v, p in zip(vals.tolist(), pos.tolist(), strict=True):
            if v == -math.inf:
                break
            rest = tuple(int(x) for x in torch.unravel_index(torch.tensor(p), [n] * free))
            item = (v, prefix + rest)
            if len(heap) < keep:
                heapq.heappush(heap, item)
            elif v > heap[0][0]:
                heapq.heapreplace(heap, item)
    best, seen = [], set()
    for v, assign in sorted(heap, key=lambda x: -x[0]):
        key = frozenset(assign)
        if key not in seen:
            seen.add(key)
            best.append((v, assign))
        if len(best) == top_k:
            break
    return best


def _matched_gaussian(vectors: Tensor, gen: torch.Generator) -> Tensor:
    """n random vectors with the candidates' mean and covariance (mixtures of their deviations)."""
    n = len(vectors)
    mu = vectors.mean(0)
    g = torch.randn(n, n, generator=gen, dtype=vectors.dtype)
    return mu + g @ (vectors - mu) / math.sqrt(max(n - 1, 1))


def _permuted_codes(codes: Tensor, gen: torch.Generator) -> Tensor:
    """Each candidate's codes permuted across inputs independently (labels no longer matter)."""
    perm = torch.argsort(torch.rand(codes.shape, generator=gen), dim=0)
    return torch.gather(codes, 0, perm)


def search_by_shape(
    constraints: Any,
    vectors: Annotated[Tensor, "n d"] | None = None,
    *,
    codes: Annotated[Tensor, "n_inputs n"] | None = None,
    labels: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    fixed: Mapping[str, Tensor] | None = None,
    basis=None,
    acts: Annotated[Tensor, "n_inputs d_model"] | None = None,
    top_k: int = ShapeConfig.top_k,
    n_random: int = ShapeConfig.n_random,
    n_tuples: int = ShapeConfig.n_tuples,
    max_grid: int = 1 << 22,
    seed: int = 0,
) -> dict[str, Any]:
    """Rank candidate tuples by how well they satisfy `constraints`, beside random baselines.

    Candidates are `vectors` (or `basis.directions`) and/or `codes` (or `basis.encode(acts)`)
    with one label per input row. Returns the top assignments with per-constraint scores, the
    best score of the same search on `n_random` random candidate sets, and random tuples' scores.
    """
    if basis is not None:
        vectors = basis.directions.detach().float().cpu() if vectors is None else vectors
        if acts is not None and codes is None:
            with torch.no_grad():
                codes = basis.encode(torch.as_tensor(acts).float()).detach().cpu()
    if codes is not None:
        codes = torch.as_tensor(codes).double()
        if labels is None or len(labels) != codes.shape[0]:
            raise ShapeSpecError(
                f"codes has {codes.shape[0]} input rows; labels must give one label per row "
                f"(got {None if labels is None else len(labels)})"
            )
    vectors = None if vectors is None else torch.as_tensor(vectors).double()
    n_vec = None if vectors is None else vectors.shape[0]
    n_code = None if codes is None else codes.shape[1]
    if n_vec is not None and n_code is not None and n_vec != n_code:
        raise ShapeSpecError(f"vectors give {n_vec} candidates but codes give {n_code}")
    n = n_vec if n_vec is not None else n_code
    if n is None:
        raise ShapeSpecError("give candidate vectors= (or basis=) and/or codes= with labels=")
    names = list(names) if names is not None else [f"f{i}" for i in range(n)]
    if len(names) != n:
        raise ShapeSpecError(f"{len(names)} names for {n} candidates")
    fixed = dict(fixed or {})
    cons = parse_constraints(
        constraints, fixed=list(fixed), labels=labels if codes is not None else None
    )
    slots = slot_order(cons)
    tab = _tables(cons, vectors, codes, labels, fixed)
    best = _search(cons, tab, n, int(top_k), int(max_grid))
    gen = torch.Generator().manual_seed(int(seed))
    rand_best = []
    for _ in range(int(n_random)):
        rv = None if vectors is None else _matched_gaussian(vectors, gen)
        rc = None if codes is None else _permuted_codes(codes, gen)
        rt = _tables(cons, rv, rc, labels, fixed)
        rand_best.append(_search(cons, rt, n, 1, int(max_grid))[0][0])
    tuples = _random_tuple_scores(cons, tab, n, len(slots), int(n_tuples), gen)
    top = best[0][0]
    return {
        "constraints": [
            c.__dict__ | {"slots": list(c.slots), "to": list(c.to), "order": list(c.order)}
            for c in cons
        ],
        "slots": slots,
        "n_candidates": n,
        "results": [
            {
                "rank": r + 1,
                "score": v,
                "assignment": {s: names[i] for s, i in zip(slots, assign, strict=True)},
                "per_constraint": score_assignment(
                    cons, tab, dict(zip(slots, assign, strict=True))
                )["per"],
            }
            for r, (v, assign) in enumerate(best)
        ],
        "best_score": top,
        "random_search": {
            "what": "the same search on random candidates (covariance-matched null): Gaussian vectors "
            "with the candidates' mean "
            "and covariance; each candidate's codes permuted across inputs",
            "best_scores": rand_best,
            "mean": sum(rand_best) / len(rand_best) if rand_best else None,
            "max": max(rand_best) if rand_best else None,
            "p_value": empirical_p(top, torch.tensor(rand_best, dtype=torch.float64)),
            "p_floor": p_floor(len(rand_best)),
        },
        "random_tuples": tuples,
    }


def _random_tuple_scores(
    cons: Sequence[Constraint], tab: _Tables, n: int, k: int, n_tuples: int, gen: torch.Generator
) -> dict[str, Any]:
    """Scores of uniformly random injective tuples of the real candidates."""
    if n_tuples < 1:
        return {"n": 0}
    picks = torch.argsort(torch.rand(n_tuples, n, generator=gen), dim=1)[:, :k]
    idx = {s: picks[:, j] for j, s in enumerate(slot_order(cons))}
    scores = _total(cons, tab, idx).float()
    return {
        "n": n_tuples,
        "mean": float(scores.mean()),
        "q95": float(scores.quantile(0.95)),
        "max": float(scores.max()),
    }


# ---------------------------------------------------------------- runner

DEFAULT_SEARCHES = {
    "parallelogram_of_concepts": {
        "candidates": "class_means",
        "constraints": [{"type": "parallelogram", "slots": ["a", "b", "c", "d"]}],
    },
    "ordered_numbers": {
        "candidates": "basis",
        "concepts": "numbers",
        "constraints": [
            {"type": "ordered", "slot": "count", "order": None},  # None: the set's class order
            {"type": "orthogonal", "slot": "count", "to": ["gender:male-female"]},
        ],
    },
}


def _class_means(ctx, hook: str, sets: Sequence[str] | None) -> tuple[Tensor, list[str]]:
    """Every class mean of the chosen (default all) harvested sets at `hook`, named set:class."""
    vecs, names = [], []
    for name in sets or list(ctx.concepts):
        for cls, v in ctx.concept(name).means(hook).items():
            vecs.append(v)
            names.append(f"{name}:{cls}")
    return torch.stack(vecs), names


def _fixed_vectors(ctx, hook: str, constraints: Sequence[Mapping]) -> dict[str, Tensor]:
    """'set:a-b' names used in `to:` lists, as class-mean differences."""
    out = {}
    for c in constraints:
        for t in c.get("to", []) or []:
            if ":" in t and "-" in t.split(":", 1)[1] and t.split(":", 1)[0] in ctx.concepts:
                out[t] = ctx.relation(t, hook)
    return out


def _default_searches(ctx) -> tuple[dict[str, Any], list[str]]:
    """DEFAULT_SEARCHES restricted to what ctx harvested, and what was left out (a search whose
    set is missing, a constraint naming a relation of a missing set)."""
    out, skipped = {}, []
    for name, s in DEFAULT_SEARCHES.items():
        if s["candidates"] == "basis" and s["concepts"] not in ctx.concepts:
            skipped.append(f"search {name}: set {s['concepts']!r} not harvested")
            continue
        cons = []
        for c in s["constraints"]:
            missing = [t for t in c.get("to", []) if t.split(":", 1)[0] not in ctx.concepts]
            if missing:
                skipped.append(
                    f"search {name}: constraint {c['type']} to {missing} (not harvested)"
                )
            else:
                cons.append(c)
        if s["candidates"] == "basis":
            classes = list(ctx.concept(s["concepts"]).classes)
            cons = [dict(c, order=classes) if c.get("order", 0) is None else c for c in cons]
        out[name] = dict(s, constraints=cons)
    return out, skipped


def run(cfg: Any, ctx) -> dict[str, Any]:
    """`analoglock-relations analyses=[shape]`: the searches of its section (`ShapeConfig`).

    Each search: candidates "class_means" (every class mean of `sets`, default all harvested) or
    "basis" (ctx.basis if fit at the hook, else an SVD of `n_features` fit on the rows of
    `concepts`; codes = those rows, labelled by class), and `constraints` (the spec in
    shape_spec.py; `to:` may name relations "set:a-b"). Default: DEFAULT_SEARCHES.
    """
    c = settings(cfg, ShapeConfig)
    hook = c.hook or ctx.hooks[0]
    skipped: list[str] = []
    searches = _plain(c.searches)
    if not searches:
        searches, skipped = _default_searches(ctx)
    out: dict[str, Any] = {"hook": hook, "searches": {}, "skipped": skipped}
    common = {"top_k": c.top_k, "n_random": c.n_random, "n_tuples": c.n_tuples, "seed": ctx.seed}
    for name, s in searches.items():
        cons = s.get("constraints")
        fixed = _fixed_vectors(ctx, hook, _plain(cons) or [])
        kind = s.get("candidates", "class_means")
        if kind == "class_means":
            vectors, names = _class_means(ctx, hook, s.get("sets"))
            res = search_by_shape(cons, vectors, names=names, fixed=fixed, **common)
        elif kind == "basis":
            ca = ctx.concept(s["concepts"])
            x, y = ca.stacked(hook)
            labels = [ca.classes[int(i)] for i in y]
            basis = basis_at(ctx.basis, hook, strict=True) or svd_basis(
                x, s.get("n_features", 32), hook
            )
            res = search_by_shape(cons, basis=basis, acts=x, labels=labels, fixed=fixed, **common)
        else:
            raise ShapeSpecError(
                f"search {name!r}: candidates must be 'class_means' or 'basis', not {kind!r}"
            )
        out["searches"][name] = res
    return out
