"""Relations of relations: relation vectors treated as objects.

Owns (1) named second-order comparisons ("is (male - female) - (king - queen) smaller than
chance?", "does lion->tiger resemble wolf->dog?"): cosine and normalised difference norm
||r1 - r2|| / mean(||r1||, ||r2||), against shuffled labels and against random directions of the
space (drawn from the concept rows' covariance) with the same norms; (2) clustering of every relation vector (average linkage on cosine
distance, cut where cosines exceed the shuffled-label null); (3) parallelogram analogies.

Level 1 (a : b :: c : ?): points are class vectors (the mean concept row of a class, centred on
the mean of all points so the shared "any token" direction does not decide nearest neighbours);
the answer is the nearest point (cosine) to c + (b - a), excluding a, b and c. Quadruples come
from relation families (lists of `set.class>set.class` pairs believed to share one relation):
every ordered pair of two members of a family. Level 2: points are the relation vectors of the
families' members (centred likewise), and quadruples pair two families that start from the same
class: (a->b in F, a->c in G) :: (a'->b' in F, a'->c' in G), i.e. "the F-vs-G relation is the
same from a and from a'" (quadruples whose answer is forced by shared targets are dropped); a
level-2 answer is right when it is any relation of the expected family (G's members are all "the
G relation", so they cannot be told apart by design).
Baselines for both levels: the offset replaced by a random direction of equal norm (n_random
draws of each kind, isotropic and from the concept rows' covariance, p-values), and the offset
dropped (nearest to c alone). Knows nothing of reports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from analoglock.relations.algebra import (
    RelationSpec,
    all_relations,
    cosine_matrix,
    null_relations,
    random_abs_cosines,
    relation_draws,
    relation_matrix,
    space_abs_cosines,
)
from analoglock.relations.common import concept_rows
from analoglock.relations.config import DEFAULT_COMPARISONS, RecursiveConfig, settings
from analoglock.relations.context import ConceptActs, RelationsContext, harvested_only
from analoglock.stats import NULL_KINDS, NULL_WHAT, empirical_p, null_directions, p_floor

log = logging.getLogger(__name__)

Quad = tuple[str, str, str, str]


def parse_point(text: str) -> tuple[str, str]:
    """`set.class` -> (set, class)."""
    if "." not in text:
        raise ValueError(f"Point {text!r} must look like 'set.class', e.g. 'royalty.king'")
    name, cls = text.split(".", 1)
    return name.strip(), cls.strip()


def parse_families(spec: Mapping[str, Sequence[str]]) -> dict[str, list[tuple[str, str]]]:
    """{family: ["set.a>set.b", ...]} -> {family: [(from, to), ...]}."""
    out = {}
    for fam, members in spec.items():
        pairs = []
        for m in members:
            if ">" not in str(m):
                raise ValueError(f"Family {fam!r}: member {m!r} must look like 'set.a>set.b'")
            a, b = (s.strip() for s in str(m).split(">", 1))
            parse_point(a), parse_point(b)
            pairs.append((a, b))
        out[str(fam)] = pairs
    return out


def usable_families(
    families: dict[str, list[tuple[str, str]]], points: Mapping[str, Tensor]
) -> dict[str, list[tuple[str, str]]]:
    """Keep members whose points exist (sets not harvested are skipped) and families with >= 2 members."""
    out = {}
    for fam, pairs in families.items():
        kept = [(a, b) for a, b in pairs if a in points and b in points]
        if len(kept) < len(pairs):
            log.info(
                "family %s: %d of %d members use sets not harvested",
                fam,
                len(pairs) - len(kept),
                len(pairs),
            )
        if len(kept) >= 2:
            out[fam] = kept
    return out


def class_points(concepts: Mapping[str, ConceptActs], hook: str) -> dict[str, Tensor]:
    """Mean concept row of every class of every set, keyed `set.class`."""
    return {
        f"{name}.{c}": ca.class_acts(hook, c).double().mean(0)
        for name, ca in concepts.items()
        for c in ca.classes
    }


def level1_quads(families: Mapping[str, list[tuple[str, str]]]) -> list[tuple[Quad, str]]:
    """(a, b, c, d) for every ordered pair of distinct members of each family."""
    out = []
    for fam, pairs in families.items():
        for i, (a, b) in enumerate(pairs):
            for j, (c, d) in enumerate(pairs):
                if i != j and len({a, b, c, d}) == 4:
                    out.append(((a, b, c, d), fam))
    return out


def relation_points(
    families: Mapping[str, list[tuple[str, str]]], points: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The relation vector to - from of every family member, keyed `from>to`."""
    return {f"{a}>{b}": points[b] - points[a] for pairs in families.values() for a, b in pairs}


def relation_groups(families: Mapping[str, list[tuple[str, str]]]) -> dict[str, str]:
    """`from>to` -> its (first) family: level-2 answers are right when they name the right family."""
    out: dict[str, str] = {}
    for fam, pairs in families.items():
        for a, b in pairs:
            out.setdefault(f"{a}>{b}", fam)
    return out


def level2_quads(families: Mapping[str, list[tuple[str, str]]]) -> list[tuple[Quad, str]]:
    """Pairs of families starting from the same class, at two different starting classes."""
    out = []
    names = list(families)
    for fi, f in enumerate(names):
        for g in names[fi + 1 :]:
            starts = {}
            for a, b in families[f]:
                for a2, c in families[g]:
                    if a == a2 and b != c:
                        starts.setdefault(a, []).append((b, c))
            keys = sorted(starts)
            for a in keys:
                for a2 in keys:
                    if a == a2:
                        continue
                    for b, c in starts[a]:
                        for b2, c2 in starts[a2]:
                            if (b, c) == (b2, c2):
                                continue  # shared targets make the answer exact by construction
                            out.append(
                                ((f"{a}>{b}", f"{a}>{c}", f"{a2}>{b2}", f"{a2}>{c2}"), f"{f}|{g}")
                            )
    return out


def analogy(
    points: Mapping[str, Tensor],
    quads: Sequence[tuple[Quad, str]],
    n_random: int = 200,
    seed: int = 0,
    center: bool = True,
    groups: Mapping[str, str] | None = None,
    space_rows: Tensor | None = None,
) -> dict[str, Any]:
    """Parallelogram accuracy: nearest (cosine) point to c + b - a, excluding a, b, c; with baselines.

    A prediction is correct when it is the expected point, or, with `groups`, any point of the
    expected point's group (level 2: every member of a consistent family is the same relation).
    Baselines: the offset replaced by `n_random` random directions of its norm (isotropic, and,
    with `space_rows`, drawn from their covariance too), and no offset at all.
    """
    if not quads:
        return {
            "n": 0,
            "note": "no analogy quadruples (families need >= 2 members whose sets were harvested)",
        }
    names = list(points)
    P = torch.stack([points[n].double() for n in names])
    if center:
        P = P - P.mean(0)
    index = {n: i for i, n in enumerate(names)}
    gen = torch.Generator().manual_seed(seed)

    def answer(query: Tensor, excl: Sequence[int]) -> int:
        sims = torch.nn.functional.cosine_similarity(P, query[None], dim=-1)
        sims[list(excl)] = -float("inf")
        return int(sims.argmax())

    def ok(pred: int, expected: int) -> bool:
        if groups is None:
            return pred == expected
        return groups.get(names[pred], names[pred]) == groups.get(names[expected], names[expected])

    kinds = [k for k in NULL_KINDS if k == "isotropic" or space_rows is not None]
    rand_hits = {k: torch.zeros(n_random) for k in kinds}
    rows, hits, hits_c = [], [], []
    for (a, b, c, d), fam in quads:
        ia, ib, ic, idd = (index[x] for x in (a, b, c, d))
        offset = P[ib] - P[ia]
        pred = answer(P[ic] + offset, (ia, ib, ic))
        pred_c = answer(P[ic], (ia, ib, ic))
        for kind in kinds:
            where = space_rows if kind == "covariance" else P
            for r, u in enumerate(null_directions(kind, n_random, where, gen)):
                rand_hits[kind][r] += ok(answer(P[ic] + u * offset.norm(), (ia, ib, ic)), idd)
        hits.append(ok(pred, idd))
        hits_c.append(ok(pred_c, idd))
        rows.append(
            {
                "a": a,
                "b": b,
                "c": c,
                "expected": d,
                "predicted": names[pred],
                "correct": hits[-1],
                "family": fam,
            }
        )
    n = len(quads)
    acc = sum(hits) / n
    rand_acc = rand_hits["isotropic"] / n
    extra = {}
    if "covariance" in rand_hits and n_random:
        cov_acc = rand_hits["covariance"] / n
        extra = {
            "random_covariance_offset_accuracy_mean": float(cov_acc.mean()),
            "p_random_covariance": empirical_p(acc, cov_acc),
        }
    return {
        "n": n,
        "n_candidates": len(names),
        "accuracy": acc,
        "random_offset_accuracy_mean": float(rand_acc.mean()) if n_random else None,
        "random_offset_accuracy_q95": float(torch.quantile(rand_acc, 0.95)) if n_random else None,
        "p_random": empirical_p(acc, rand_acc) if n_random else None,
        **extra,
        "p_floor": p_floor(n_random) if n_random else None,
        "random_offsets": {k: NULL_WHAT[k] for k in kinds},
        "no_offset_accuracy": sum(hits_c) / n,
        "chance": 1 / max(len(names) - 3, 1),
        "by_family": {
            fam: sum(h for h, (_, f) in zip(hits, quads, strict=True) if f == fam)
            / sum(1 for _, f in quads if f == fam)
            for fam in dict.fromkeys(f for _, f in quads)
        },
        "quads": rows,
    }


def compare_relations(
    concepts: Mapping[str, ConceptActs],
    hook: str,
    comparisons: Sequence[tuple[RelationSpec, RelationSpec]],
    n_null: int = 500,
    n_random: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Second-order comparisons: cos(r1, r2) and ||r1 - r2|| / mean norm, each against both nulls.

    Cosine p-values are two-sided (|cos - null mean|); the difference p-values ask "smaller than
    chance?" (one-sided)."""
    if not comparisons:
        return []
    specs = list(dict.fromkeys(s for pair in comparisons for s in pair))
    _, _, gen, obs, null, rows = relation_draws(concepts, hook, specs, n_null, seed)
    rnd_cos = (
        space_abs_cosines(rows, n_random, gen)
        * torch.where(torch.rand(n_random, generator=gen) < 0.5, -1.0, 1.0).double()
    )
    iso_abs = random_abs_cosines(rows.shape[-1], n_random, gen)
    out = []
    for s1, s2 in comparisons:
        i, j = specs.index(s1), specs.index(s2)

        def nd(a: Tensor, b: Tensor) -> Tensor:
            return (a - b).norm(dim=-1) / ((a.norm(dim=-1) + b.norm(dim=-1)) / 2)

        c = float(cosine_matrix(obs[[i, j]])[0, 1])
        d = float(nd(obs[i], obs[j]))
        c_null = torch.nn.functional.cosine_similarity(null[:, i], null[:, j], dim=-1)
        d_null = nd(null[:, i], null[:, j])
        n1, n2 = obs[i].norm(), obs[j].norm()
        d_rand = (n1**2 + n2**2 - 2 * n1 * n2 * rnd_cos).clamp_min(0).sqrt() / ((n1 + n2) / 2)
        out.append(
            {
                "r1": s1.label,
                "r2": s2.label,
                "cos": c,
                "cos_null_shuffled_mean": float(c_null.mean()),
                "p_cos_shuffled": empirical_p(
                    abs(c - float(c_null.mean())), (c_null - c_null.mean()).abs()
                ),
                "cos_random_q95": float(torch.quantile(rnd_cos.abs(), 0.95)),
                "p_cos_random": empirical_p(abs(c), rnd_cos.abs()),
                "cos_isotropic_q95": float(torch.quantile(iso_abs, 0.95)),
                "p_cos_isotropic": empirical_p(abs(c), iso_abs),
                "normalised_difference": d,
                "normalised_difference_null_shuffled_mean": float(d_null.mean()),
                "p_smaller_than_shuffled": empirical_p(d, d_null, greater=False),
                "normalised_difference_random_mean": float(d_rand.mean()),
                "p_smaller_than_random": empirical_p(d, d_rand, greater=False),
                "random": "random directions of the space (the concept rows' covariance); "
                "p_cos_isotropic: isotropic ones",
                "norms": [float(n1), float(n2)],
            }
        )
    return out


def cluster_relations(
    concepts: Mapping[str, ConceptActs], hook: str, n_null: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Average-linkage clusters of every relation vector, cut at the shuffled-label null's q95 cosine."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    specs = all_relations(concepts)
    if len(specs) < 2:
        return {"clusters": [], "note": "fewer than two relation vectors"}
    items = {n: ca.items_tensor(hook).double() for n, ca in concepts.items()}
    classes = {n: ca.classes for n, ca in concepts.items()}
    gen = torch.Generator().manual_seed(seed)
    obs = relation_matrix(items, classes, specs)
    null = null_relations(items, classes, specs, n_null, gen)
    cos = cosine_matrix(obs)
    iu = torch.triu_indices(len(specs), len(specs), 1)
    cut = float(torch.quantile(cosine_matrix(null)[:, iu[0], iu[1]].flatten(), 0.95))
    dist = (1 - cos).clamp_min(0).numpy()
    dist = (dist + dist.T) / 2
    for k in range(len(dist)):
        dist[k, k] = 0.0
    z = linkage(squareform(dist, checks=False), method="average")
    lab = fcluster(z, t=1 - cut, criterion="distance")
    groups: dict[int, list[int]] = {}
    for k, g in enumerate(lab.tolist()):
        groups.setdefault(g, []).append(k)
    clusters = []
    for members in groups.values():
        if len(members) < 2:
            continue
        sub = cos[members][:, members]
        m = len(members)
        clusters.append(
            {
                "members": [specs[k].label for k in members],
                "mean_cos": float((sub.sum() - m) / (m * (m - 1))),
            }
        )
    clusters.sort(key=lambda c: -c["mean_cos"])
    return {
        "cut_cos": cut,
        "rule": "average linkage on 1 - cos, cut where average cosine falls below the q95 of "
        "shuffled-label relation cosines",
        "clusters": clusters,
        "singletons": [specs[k].label for g in groups.values() if len(g) == 1 for k in g],
    }


def recursive(
    concepts: Mapping[str, ConceptActs],
    hook: str,
    families: Mapping[str, Sequence[str]] | None = None,
    comparisons: Sequence[Sequence[str]] = (),
    n_null: int = RecursiveConfig.n_null,
    n_random: int = RecursiveConfig.n_random,
    seed: int = 0,
    strict: bool = True,
) -> dict[str, Any]:
    """Comparisons, clusters, and level-1 / level-2 analogy accuracies at one hook.

    A comparison naming a set that was not harvested is an error when `strict`, else it is left
    out and listed under "comparisons_skipped"."""
    pts = class_points(concepts, hook)
    fams = usable_families(parse_families(families or {}), pts)
    specs = []
    for pair in comparisons:
        if len(pair) != 2:
            raise ValueError(f"comparison {pair!r} must be two relations 'set:a-b'")
        a, b = (RelationSpec.parse(str(p)) for p in pair)
        specs.append((f"{a.label} vs {b.label}", (a.set, b.set), (a, b)))
    comps, skipped = harvested_only(specs, concepts, explicit=strict, what="comparison")
    rel_pts = relation_points(fams, pts)
    rows = concept_rows(concepts, hook)
    return {
        "hook": hook,
        "families": {f: [f"{a}>{b}" for a, b in p] for f, p in fams.items()},
        "comparisons": compare_relations(concepts, hook, comps, n_null, seed=seed),
        "comparisons_skipped": skipped,
        "clusters": cluster_relations(concepts, hook, min(n_null, 200), seed),
        "level1": analogy(pts, level1_quads(fams), n_random, seed, space_rows=rows),
        # relation vectors are differences already: no shared offset to centre away
        "level2": analogy(
            rel_pts,
            level2_quads(fams),
            n_random,
            seed + 1,
            center=False,
            groups=relation_groups(fams),
            space_rows=rows,
        ),
    }


def run(cfg, ctx: RelationsContext) -> dict[str, Any]:
    """Relations of relations at every hook (`RecursiveConfig`)."""
    c = settings(cfg, RecursiveConfig)
    comparisons = [list(p) for p in (c.comparisons or DEFAULT_COMPARISONS)]
    return {
        "by_hook": {
            hook: recursive(
                ctx.concepts,
                hook,
                dict(c.families),
                comparisons,
                n_null=c.n_null,
                n_random=c.n_random,
                seed=ctx.seed,
                strict=c.comparisons is not None,
            )
            for hook in ctx.hooks
        }
    }
