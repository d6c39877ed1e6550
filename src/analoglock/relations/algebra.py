"""Vector algebra on concepts: relation vectors, their cosine matrix with nulls, composites.

Owns (1) relation vectors: the mean paired difference of two classes of a contrast set
("gender:male-female", "animals:lion-tiger"), computed for every class pair automatically;
(2) their cosine matrix with two nulls: shuffled labels (class labels permuted across the rows of
each set, all relation vectors recomputed) and random directions of the same space (drawn from the
concept rows' covariance, since the residual stream is anisotropic; isotropic ones are reported
too), so "aligned" and "orthogonal" carry p-values (and Benjamini-Hochberg q-values);
(3) composites ("male + angry"): whether adding the sum of two relation vectors at a hook moves
later-layer probe readouts and activations by the sum of the parts, beside random vectors of the
same norms (isotropic, and drawn from the concept rows' covariance). Knows nothing of reports or the CLI beyond the `run(cfg, ctx)` runner.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor

from analoglock.hooks import resid_post_after
from analoglock.relations.concepts import HELDOUT, add_at_concept, forward_concepts
from analoglock.relations.config import DEFAULT_COMPOSITES, AlgebraConfig, settings
from analoglock.relations.context import (
    ConceptActs,
    RelationsContext,
    harvested_only,
    split_pair_spec,
)
from analoglock.relations.vectors import balanced_accuracy, contrast_rows, fit_probe
from analoglock.stats import (
    NULL_KINDS,
    NULL_WHAT,
    bh_adjust,
    covariance_directions,
    empirical_p,
    null_directions,
    p_floor,
    random_unit_directions,
)

log = logging.getLogger(__name__)

VERDICTS = ("aligned", "anti-aligned", "orthogonal", "weak")
Q_FROM = (
    "model-based: BH over p_shuffled_normal, the two-sided tail of a normal fitted to the "
    "shuffled-label null (z = (cos - null mean) / null sd); not a permutation p (that is "
    "p_shuffled, whose floor 1 / (n_null + 1) BH over the whole matrix could never pass)"
)


@dataclass(frozen=True)
class RelationSpec:
    """Relation vector `a - b` of contrast set `set`."""

    set: str
    a: str
    b: str

    @property
    def label(self) -> str:
        """`set:a-b`."""
        return f"{self.set}:{self.a}-{self.b}"

    @classmethod
    def parse(cls, text: str) -> RelationSpec:
        """From `set:a-b` (class names may not contain '-')."""
        return cls(*split_pair_spec(text, "Relation", "'set:a-b'"))


def all_relations(concepts: dict[str, ConceptActs]) -> list[RelationSpec]:
    """Every class pair (in class order) of every set: the automatic pairwise differences."""
    return [
        RelationSpec(name, a, b)
        for name, ca in concepts.items()
        for i, a in enumerate(ca.classes)
        for b in ca.classes[i + 1 :]
    ]


def check_specs(concepts: dict[str, ConceptActs], specs: Sequence[RelationSpec]) -> None:
    """Every spec names a harvested set and two of its classes."""
    for s in specs:
        if s.set not in concepts:
            raise ValueError(
                f"Relation {s.label}: set {s.set!r} not harvested; have {', '.join(concepts)}"
            )
        cls = concepts[s.set].classes
        if s.a not in cls or s.b not in cls or s.a == s.b:
            raise ValueError(f"Relation {s.label}: classes must be two of {', '.join(cls)}")


def relation_draws(
    concepts: dict[str, ConceptActs],
    hook: str,
    specs: Sequence[RelationSpec],
    n_null: int,
    seed: int,
) -> tuple[dict, dict, torch.Generator, Tensor, Tensor, Tensor]:
    """Checked specs -> (items, classes, generator, observed relations, shuffled-label null, all rows).

    The generator is returned mid-stream so later draws (random directions) follow the null's.
    """
    check_specs(concepts, specs)
    items = {n: ca.items_tensor(hook).double() for n, ca in concepts.items()}
    classes = {n: ca.classes for n, ca in concepts.items()}
    gen = torch.Generator().manual_seed(seed)
    obs = relation_matrix(items, classes, specs)
    null = null_relations(items, classes, specs, n_null, gen)
    rows = torch.cat([ca.stacked(hook)[0] for ca in concepts.values()])
    return items, classes, gen, obs, null, rows


def relation_matrix(
    items: dict[str, Annotated[Tensor, "n k d"]],
    classes: dict[str, tuple[str, ...]],
    specs: Sequence[RelationSpec],
) -> Annotated[Tensor, "r d"]:
    """Relation vectors (mean over items of x[a] - x[b]) stacked in spec order."""
    rows = []
    for s in specs:
        x = items[s.set]
        rows.append(
            (x[:, classes[s.set].index(s.a)] - x[:, classes[s.set].index(s.b)]).double().mean(0)
        )
    return torch.stack(rows)


def shuffle_labels(x: Annotated[Tensor, "n k d"], gen: torch.Generator) -> Tensor:
    """The labels-shuffled null: class labels permuted across every row of the set (class sizes kept).

    Permuting across rows, not within items: a within-item swap keeps which rows pair up, and with
    a strong concept the swapped mean difference still lies on the concept's own axis (only its
    sign is random), so that null would inherit the very structure it should remove.
    """
    n, k, d = x.shape
    perm = torch.randperm(n * k, generator=gen)
    return x.reshape(n * k, d)[perm].reshape(n, k, d)


def swap_within_items(x: Annotated[Tensor, "n k d"], gen: torch.Generator) -> Tensor:
    """The paired null for norms: class labels permuted independently within each matched item.

    Right for "is there a consistent difference at all?" (a relation's norm), where the content an
    item's rows share must cancel; not for directions (see `shuffle_labels`).
    """
    n, k, _ = x.shape
    perm = torch.argsort(torch.rand(n, k, generator=gen), dim=1)
    return torch.gather(x, 1, perm[:, :, None].expand_as(x))


def null_relations(
    items: dict[str, Tensor],
    classes: dict[str, tuple[str, ...]],
    specs: Sequence[RelationSpec],
    n_null: int,
    gen: torch.Generator,
    paired: bool = False,
) -> Annotated[Tensor, "n_null r d"]:
    """Relation vectors recomputed `n_null` times with labels shuffled across rows (every set), or
    within items when `paired` (the null for norms)."""
    shuffle = swap_within_items if paired else shuffle_labels
    out = []
    for _ in range(n_null):
        shuffled = {name: shuffle(x, gen) for name, x in items.items()}
        out.append(relation_matrix(shuffled, classes, specs))
    return torch.stack(out)


def cosine_matrix(v: Annotated[Tensor, "... r d"]) -> Annotated[Tensor, "... r r"]:
    """Pairwise cosines of the rows (batched)."""
    u = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return u @ u.transpose(-1, -2)


def random_abs_cosines(d: int, n: int, gen: torch.Generator) -> Annotated[Tensor, "n"]:
    """|cos| between n pairs of independent isotropic random directions in d dimensions."""
    a, b = random_unit_directions(n, d, gen), random_unit_directions(n, d, gen)
    return (a * b).sum(-1).abs()


def space_abs_cosines(
    rows: Annotated[Tensor, "n d"], n: int, gen: torch.Generator
) -> Annotated[Tensor, "n"]:
    """|cos| between n pairs of random directions drawn from the rows' own covariance.

    The residual stream is anisotropic, so two arbitrary directions of it are far less orthogonal
    than isotropic ones; this is the "random direction in the same space" null (N(0, cov(rows))).
    """
    a, b = covariance_directions(rows, n, gen), covariance_directions(rows, n, gen)
    return (a * b).sum(-1).abs()


def verdict(cos: float, q_shuffled: float, p_space: float, alpha: float) -> str:
    """aligned / anti-aligned: both nulls reject; orthogonal: the shuffled-label null does not
    (cos is indistinguishable from label noise); weak: beyond label noise, but no larger than two
    random directions of this space typically give."""
    if q_shuffled >= alpha:
        return "orthogonal"
    if p_space < alpha:
        return "aligned" if cos > 0 else "anti-aligned"
    return "weak"


def cosine_stats(
    obs: Annotated[Tensor, "r d"],
    null: Annotated[Tensor, "n r d"],
    labels: Sequence[str],
    gen: torch.Generator,
    n_random: int = 2000,
    alpha: float = 0.05,
    space_rows: Tensor | None = None,
) -> dict[str, Any]:
    """Cosine matrix of `obs` with per-entry p-values against shuffled labels (two-sided around the
    null mean, BH q over the matrix), random directions of the space (`space_rows`' covariance) and
    isotropic random directions; and a verdict per pair."""
    cos = cosine_matrix(obs.double())
    cnull = cosine_matrix(null.double())  # [n, r, r]
    n = cnull.shape[0]
    mu = cnull.mean(0)
    p_al = (1 + ((cnull - mu).abs() >= (cos - mu).abs()[None] - 1e-12).sum(0)) / (1 + n)
    # An empirical p cannot go below 1 / (n + 1), which BH over a whole matrix never lets pass;
    # the tail comes from a normal fitted to the same null (z = (cos - mean) / sd).
    sd = cnull.std(0).clamp_min(1e-12)
    z = (cos - mu) / sd
    p_tail = torch.special.erfc(z.abs() / math.sqrt(2))
    iso = random_abs_cosines(obs.shape[-1], n_random, gen)
    space = space_abs_cosines(space_rows, n_random, gen) if space_rows is not None else iso
    iso95, space95 = float(torch.quantile(iso, 0.95)), float(torch.quantile(space, 0.95))
    p_space, p_iso = empirical_p(cos.abs(), space), empirical_p(cos.abs(), iso)
    iu = torch.triu_indices(len(labels), len(labels), 1)
    flat_p = p_tail[iu[0], iu[1]]
    q = bh_adjust(flat_p) if flat_p.numel() else flat_p
    pairs = []
    for t, (i, j) in enumerate(iu.T.tolist()):
        c = float(cos[i, j])
        pairs.append(
            {
                "a": labels[i],
                "b": labels[j],
                "cos": c,
                "null_shuffled_mean": float(mu[i, j]),
                "null_shuffled_sd": float(cnull[:, i, j].std()),
                "z_shuffled": float(z[i, j]),
                "p_shuffled": float(p_al[i, j]),
                "p_shuffled_normal": float(p_tail[i, j]),
                "q_shuffled": float(q[t]),
                "space_random_abs_cos_q95": space95,
                "p_space_random": float(p_space[i, j]),
                "isotropic_abs_cos_q95": iso95,
                "p_isotropic": float(p_iso[i, j]),
                "verdict": verdict(c, float(q[t]), float(p_space[i, j]), alpha),
            }
        )
    return {
        "labels": list(labels),
        "cos": cos.tolist(),
        "p_shuffled": p_al.tolist(),
        "p_shuffled_normal": p_tail.tolist(),
        "null_shuffled_mean": mu.tolist(),
        "space_random_abs_cos_q95": space95,
        "isotropic_abs_cos_q95": iso95,
        "n_null": n,
        "n_random": n_random,
        "alpha": alpha,
        "p_floor": {"shuffled": p_floor(n), "random": p_floor(n_random)},
        "q_shuffled_from": Q_FROM,
        "random_directions": {
            "space": NULL_WHAT["covariance"],
            "isotropic": NULL_WHAT["isotropic"],
        },
        "verdict_rule": "orthogonal if q_shuffled (BH over the matrix of the normal-tail p "
        "p_shuffled_normal) >= alpha; else aligned/anti-aligned if p_space_random < alpha, else weak",
        "pairs": pairs,
    }


def norm_stats(obs: Tensor, null: Tensor, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Each relation vector's norm against the paired (within-item) null norms."""
    out = []
    for i, lab in enumerate(labels):
        nl = null[:, i].norm(dim=-1)
        v = float(obs[i].norm())
        out.append(
            {
                "relation": lab,
                "norm": v,
                "null_mean": float(nl.mean()),
                "null_sd": float(nl.std()),
                "p": empirical_p(v, nl),
            }
        )
    return out


def relation_algebra(
    concepts: dict[str, ConceptActs],
    hook: str,
    specs: Sequence[RelationSpec] | None = None,
    n_null: int = 500,
    n_random: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Relation vectors of every class pair (or `specs`), cosines with p-values and norms with nulls."""
    specs = list(specs or all_relations(concepts))
    items, classes, gen, obs, null, rows = relation_draws(concepts, hook, specs, n_null, seed)
    labels = [s.label for s in specs]
    return {
        "hook": hook,
        "relations": labels,
        "cosines": cosine_stats(obs, null, labels, gen, n_random, alpha, space_rows=rows),
        "norms": norm_stats(
            obs, null_relations(items, classes, specs, n_null, gen, paired=True), labels
        ),
        "_vectors": obs.float(),
    }


# ---------------------------------------------------------------- composites


def _train_relation(ca: ConceptActs, hook: str, spec: RelationSpec) -> Tensor:
    """Train-split mean paired difference a - b."""
    xp, xn = contrast_rows(ca, hook, spec.a, spec.b)
    tr = ca.split_mask("train")
    return (xp[tr] - xn[tr]).double().mean(0).float()


def _readout(ca: ConceptActs, clean: Tensor, spec: RelationSpec, steps: int) -> tuple[Any, float]:
    """A binary probe (a vs b) on clean train rows at the read hook and its held-out accuracy."""
    k = len(ca.classes)
    rows = clean.reshape(ca.n_items, k, -1)
    ia, ib = ca.classes.index(spec.a), ca.classes.index(spec.b)
    tr, te = ca.split_mask("train"), ca.split_mask(*HELDOUT)
    x = torch.cat([rows[tr, ia], rows[tr, ib]])
    y = torch.cat([torch.ones(int(tr.sum())), torch.zeros(int(tr.sum()))]).long()
    probe = fit_probe(x, y, 2, steps=steps)
    xt = torch.cat([rows[te, ia], rows[te, ib]])
    yt = torch.cat([torch.ones(int(te.sum())), torch.zeros(int(te.sum()))]).long()
    return probe, balanced_accuracy(probe.predict(xt), yt)


def additivity(d_a: Tensor, d_b: Tensor, d_ab: Tensor) -> dict[str, float]:
    """How far the effect of the sum is from the sum of the effects (rows are docs)."""
    pred = d_a + d_b
    err = (d_ab - pred).norm(dim=-1).mean() / pred.norm(dim=-1).mean().clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(d_ab, pred, dim=-1).mean()
    return {"relative_error": float(err), "cosine": float(cos)}


def _clean_gap(ca: ConceptActs, clean: Tensor, spec: RelationSpec, probe) -> float:
    """The probe's held-out readout gap between classes a and b on clean rows."""
    rows = clean.reshape(ca.n_items, len(ca.classes), -1)[ca.split_mask(*HELDOUT)]
    lg = probe.logits(
        torch.cat([rows[:, ca.classes.index(spec.a)], rows[:, ca.classes.index(spec.b)]])
    )
    r = lg[:, 1] - lg[:, 0]
    return float(r[: len(rows)].mean() - r[len(rows) :].mean())


def _effect(deltas: dict[str, Tensor], base: Tensor, probes: dict, gap: dict) -> dict[str, Any]:
    """Additivity of the activation changes and each probe's readout shift, in class gaps."""
    read = {}
    for label, (probe, _) in probes.items():
        lg0 = probe.logits(base)
        r0 = lg0[:, 1] - lg0[:, 0]

        def shift(delta: Tensor, probe=probe, r0=r0, g=gap[label]) -> float:
            lg1 = probe.logits(base + delta)
            return float(((lg1[:, 1] - lg1[:, 0]) - r0).mean()) / max(abs(g), 1e-12)

        s = {k: shift(v) for k, v in deltas.items()}
        s["sum_of_parts"] = s["a"] + s["b"]
        read[label] = s
    activation = additivity(deltas["a"], deltas["b"], deltas["a+b"])
    return {"activation": activation, "readout_shift_in_gaps": read}


def composite(
    model,
    concepts: dict[str, ConceptActs],
    hook: str,
    read_hook: str,
    spec_a: RelationSpec,
    spec_b: RelationSpec,
    scale: float = AlgebraConfig.scale,
    n_random: int = AlgebraConfig.n_composite_random,
    seed: int = 0,
    probe_steps: int = 100,
) -> dict[str, Any]:
    """Steer held-out concept tokens of both sets by a, b and a + b at `hook`; compare readouts at `read_hook`.

    Effects are measured as (1) changes in each relation's probe logit at `read_hook` (in units of its
    clean held-out class gap) and (2) the change of the activation at `read_hook`; additivity is the
    relative error of effect(a + b) vs effect(a) + effect(b). Control: `n_random` pairs of random
    vectors with the norms of a and b, of each kind (isotropic; drawn from the covariance of both
    sets' concept rows at `hook`), whose additivity error is the baseline nonlinearity at that
    norm; `p_smaller` is the fraction of them (+1 corrected) at least as additive as a + b.
    """
    check_specs(concepts, [spec_a, spec_b])
    sets = list(dict.fromkeys([spec_a.set, spec_b.set]))
    va = scale * _train_relation(concepts[spec_a.set], hook, spec_a)
    vb = scale * _train_relation(concepts[spec_b.set], hook, spec_b)
    docs = [d for name in sets for d in concepts[name].documents(*HELDOUT)[0]]
    clean = {
        name: forward_concepts(model, concepts[name].docs, [read_hook], concepts[name].pool)
        for name in sets
    }
    probes, gap = {}, {}
    for spec in (spec_a, spec_b):
        ca, rows = concepts[spec.set], clean[spec.set][read_hook]
        probes[spec.label] = _readout(ca, rows, spec, probe_steps)
        gap[spec.label] = _clean_gap(ca, rows, spec, probes[spec.label][0])
    pool = concepts[sets[0]].pool
    base = forward_concepts(model, docs, [read_hook], pool)[read_hook]

    def effects(a: Tensor, b: Tensor) -> list[dict[str, Any]]:
        """Effects of k pairs (a[i], b[i]) at once: the documents repeated once per pair."""
        k, n = len(a), len(docs)
        runs = {}
        for name, v in (("a", a), ("b", b), ("a+b", a + b)):
            edit = add_at_concept(v.repeat_interleave(n, 0))
            rows = forward_concepts(model, docs * k, [read_hook], pool, hook, edit)[read_hook]
            runs[name] = rows.reshape(k, n, -1) - base
        return [_effect({m: r[i] for m, r in runs.items()}, base, probes, gap) for i in range(k)]

    observed = effects(va[None], vb[None])[0]
    obs_err = observed["activation"]["relative_error"]
    gen = torch.Generator().manual_seed(seed)
    rows = torch.cat([concepts[name].stacked(hook)[0] for name in sets])
    controls, errors = {}, {}
    for kind in NULL_KINDS:
        if n_random < 1:
            break
        u = null_directions(kind, 2 * n_random, rows, gen).float()
        controls[kind] = effects(u[0::2] * va.norm(), u[1::2] * vb.norm())
        err = torch.tensor([c["activation"]["relative_error"] for c in controls[kind]])
        errors[kind] = {
            "what": NULL_WHAT[kind],
            "n": len(err),
            "mean": float(err.mean()),
            "min": float(err.min()),
            "p_smaller": empirical_p(obs_err, err, greater=False),
            "p_floor": p_floor(len(err)),
        }
    iso = [c["activation"]["relative_error"] for c in controls.get("isotropic", [])]
    return {
        "a": spec_a.label,
        "b": spec_b.label,
        "hook": hook,
        "read_hook": read_hook,
        "scale": scale,
        "norms": {
            "a": float(va.norm()),
            "b": float(vb.norm()),
            "cos(a,b)": float(torch.nn.functional.cosine_similarity(va, vb, dim=0)),
        },
        "probe_heldout_accuracy": {k: v[1] for k, v in probes.items()},
        "clean_gap": gap,
        "observed": observed,
        "random_control": controls,
        "random_relative_error": errors,
        "random_relative_error_mean": sum(iso) / len(iso) if iso else None,
        "additive": bool(obs_err <= max(iso)) if iso else None,
        "additive_rule": "relative error no larger than the largest of the isotropic controls'",
        "n_docs": len(docs),
    }


# ---------------------------------------------------------------- runner


def run(cfg, ctx: RelationsContext) -> dict[str, Any]:
    """Relation algebra at every hook, plus the composites of its section (`AlgebraConfig`)."""
    c = settings(cfg, AlgebraConfig)
    specs = [RelationSpec.parse(s) for s in (c.relations or [])] or None
    pairs = [
        tuple(RelationSpec.parse(x) for x in pair) for pair in (c.composites or DEFAULT_COMPOSITES)
    ]
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"composite {[p.label for p in pair]} must be two relations 'set:a-b'")
    pairs, skipped = harvested_only(
        [(f"{a.label} + {b.label}", (a.set, b.set), (a, b)) for a, b in pairs],
        ctx.concepts,
        explicit=c.composites is not None,
        what="composite",
    )
    out: dict[str, Any] = {"by_hook": {}, "composites_skipped": skipped}
    for hook in ctx.hooks:
        res = relation_algebra(
            ctx.concepts, hook, specs, c.n_null, c.n_random, c.alpha, seed=ctx.seed
        )
        res.pop("_vectors")
        read_hook = resid_post_after(hook, c.read_offset, ctx.model.cfg.n_layers) if pairs else None
        res["composites"] = [
            composite(
                ctx.model,
                ctx.concepts,
                hook,
                read_hook,
                a,
                b,
                scale=c.scale,
                n_random=c.n_composite_random,
                seed=ctx.seed,
            )
            for a, b in pairs
        ]
        out["by_hook"][hook] = res
    return out
