"""Causal separability: does pushing along concept A's vector move A's readout and nothing else?

Owns the separability matrix. For each contrast A (`set:pos-neg`, or `set:pos-rest`), its vector
is the train-split mean paired difference at the edit hook, which is exactly the typical gap between
the two classes' projections. We add it (+scale) and subtract it (-scale) at the concept tokens of
every held-out document of every set, run the model on, and read every contrast B with a linear
probe fit on clean train rows at a later `read_hook`:
S[A, B] = (readout_B(+) - readout_B(-)) / (2 * clean held-out gap of B), so S[A, A] = 1 means the push
moves A's readout by one full class gap. Controls: random directions with the norm of A's vector,
pushed the same way, of two kinds (isotropic, and drawn from the covariance of the concept rows at
the edit hook); every entry carries a p-value against the pooled |S| of each kind's controls, and
`separable` needs both nulls to reject.
Linear representation predicts a large diagonal and small off-diagonal entries (except where two
contrasts really share a direction, which the algebra module measures). Knows nothing of reports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.hooks import resid_post_after
from analoglock.relations.common import concept_rows
from analoglock.relations.concepts import HELDOUT, add_at_concept, forward_concepts
from analoglock.relations.config import DEFAULT_CONTRASTS, SeparabilityConfig, settings
from analoglock.relations.context import (
    ConceptActs,
    RelationsContext,
    harvested_only,
    split_pair_spec,
)
from analoglock.relations.vectors import balanced_accuracy, contrast_name, contrast_rows, fit_probe
from analoglock.stats import NULL_KINDS, NULL_WHAT, empirical_p, null_directions, p_floor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contrast:
    """Class `pos` of set `set` against class `neg`, or against the other classes (neg None)."""

    set: str
    pos: str
    neg: str | None = None

    @property
    def label(self) -> str:
        """`set:pos-neg` or `set:pos-rest`."""
        return f"{self.set}:{contrast_name(self.pos, self.neg)}"

    @classmethod
    def parse(cls, text: str) -> Contrast:
        """From `set:pos-neg` or `set:pos-rest`."""
        name, pos, neg = split_pair_spec(text, "Contrast", "'set:pos-neg' or 'set:pos-rest'")
        return cls(name, pos, None if neg == "rest" else neg)


def default_contrasts(concepts: dict[str, ConceptActs]) -> list[Contrast]:
    """Binary sets: first class vs second; larger sets: each class vs the rest."""
    out = []
    for name, ca in concepts.items():
        if len(ca.classes) == 2:
            out.append(Contrast(name, ca.classes[0], ca.classes[1]))
        else:
            out += [Contrast(name, c, None) for c in ca.classes]
    return out


def check_contrasts(concepts: dict[str, ConceptActs], contrasts: Sequence[Contrast]) -> None:
    """Each contrast names a harvested set and its classes."""
    if not contrasts:
        raise ValueError("separability needs at least one contrast")
    for c in contrasts:
        if c.set not in concepts:
            raise ValueError(
                f"Contrast {c.label}: set {c.set!r} not harvested; have {', '.join(concepts)}"
            )
        cls = concepts[c.set].classes
        bad = [x for x in (c.pos, c.neg) if x is not None and x not in cls]
        if bad or c.pos == c.neg:
            raise ValueError(f"Contrast {c.label}: classes must be in {', '.join(cls)} (or 'rest')")


def contrast_vector(ca: ConceptActs, hook: str, c: Contrast) -> Tensor:
    """Train-split mean paired difference pos - neg at `hook`."""
    xp, xn = contrast_rows(ca, hook, c.pos, c.neg)
    tr = ca.split_mask("train")
    return (xp[tr] - xn[tr]).double().mean(0).float()


def _readout_probe(
    ca: ConceptActs, rows: Tensor, c: Contrast, steps: int
) -> tuple[Any, float, float]:
    """Probe for contrast c on clean train rows [n_items * k, d]; held-out accuracy and class gap."""
    k = len(ca.classes)
    x3 = rows.reshape(ca.n_items, k, -1)
    pos = x3[:, ca.classes.index(c.pos)]
    negs = [c.neg] if c.neg is not None else [x for x in ca.classes if x != c.pos]
    neg = torch.stack([x3[:, ca.classes.index(n)] for n in negs]).mean(0)
    tr, te = ca.split_mask("train"), ca.split_mask(*HELDOUT)
    n_tr, n_te = int(tr.sum()), int(te.sum())
    probe = fit_probe(
        torch.cat([pos[tr], neg[tr]]),
        torch.cat([torch.ones(n_tr), torch.zeros(n_tr)]).long(),
        2,
        steps=steps,
    )
    real_neg = torch.cat([x3[te, ca.classes.index(n)] for n in negs])
    xt = torch.cat([pos[te], real_neg])
    yt = torch.cat([torch.ones(n_te), torch.zeros(len(real_neg))]).long()
    acc = balanced_accuracy(probe.predict(xt), yt)
    r = _score(probe, xt)
    gap = float(r[yt == 1].mean() - r[yt == 0].mean())
    return probe, acc, gap


def _score(probe, x: Tensor) -> Tensor:
    """Readout: logit(pos) - logit(neg)."""
    lg = probe.logits(x)
    return lg[:, 1] - lg[:, 0]


def separability(
    model,
    concepts: dict[str, ConceptActs],
    hook: str,
    read_hook: str,
    contrasts: Sequence[Contrast] | None = None,
    scale: float = 1.0,
    n_random: int = SeparabilityConfig.n_random,
    seed: int = 0,
    probe_steps: int = 100,
    alpha: float = 0.05,
    progress: bool = True,
) -> dict[str, Any]:
    """The separability matrix S[A, B] with random-direction controls (see module docstring)."""
    contrasts = list(contrasts or default_contrasts(concepts))
    check_contrasts(concepts, contrasts)
    sets = list(dict.fromkeys(c.set for c in contrasts))
    docs, owner = [], []
    for name in sets:
        d, _, _ = concepts[name].documents(*HELDOUT)
        docs += d
        owner += [name] * len(d)
    owner_t = {name: torch.tensor([o == name for o in owner]) for name in sets}
    pool = concepts[sets[0]].pool
    clean = {
        name: forward_concepts(model, concepts[name].docs, [read_hook], pool)[read_hook]
        for name in sets
    }
    probes, accs, gaps = {}, {}, {}
    for c in contrasts:
        probes[c.label], accs[c.label], gaps[c.label] = _readout_probe(
            concepts[c.set], clean[c.set], c, probe_steps
        )
    vectors = {c.label: contrast_vector(concepts[c.set], hook, c) for c in contrasts}

    def readouts(v: Tensor) -> Tensor:
        rows = forward_concepts(model, docs, [read_hook], pool, hook, add_at_concept(v))[read_hook]
        return torch.tensor(
            [float(_score(probes[c.label], rows[owner_t[c.set]]).mean()) for c in contrasts]
        )

    gap_t = torch.tensor([gaps[c.label] for c in contrasts]).clamp_min(1e-6)

    def push(v: Tensor) -> Tensor:
        return (readouts(scale * v) - readouts(-scale * v)) / (2 * gap_t)

    gen = torch.Generator().manual_seed(seed)
    n, m = len(contrasts), max(int(n_random), 0)
    space = concept_rows({name: concepts[name] for name in sets}, hook)
    S = torch.zeros(n, n)
    R = {kind: torch.zeros(n, m, n) for kind in NULL_KINDS}  # [pushed, draw, read]
    bar = tqdm(total=n * (1 + len(R) * m), desc="separability", disable=not progress)
    for i, c in enumerate(contrasts):
        v = vectors[c.label]
        S[i] = push(v)
        bar.update(1)
        for kind, r in R.items():
            for j, u in enumerate(null_directions(kind, m, space, gen).float()):
                r[i, j] = push(u * v.norm())
                bar.update(1)
    bar.close()
    # every entry against the pooled |S| of each kind's controls; the larger p decides
    p_kind = {k: empirical_p(S.abs(), r.abs()) for k, r in R.items()} if m else {}
    p = torch.stack(list(p_kind.values())).max(0).values if p_kind else None
    labels = [c.label for c in contrasts]
    rows = []
    for i, c in enumerate(contrasts):
        off = [j for j in range(n) if j != i and contrasts[j].set != c.set]
        worst = max(off, key=lambda j: abs(float(S[i, j])), default=None)
        rows.append(
            {
                "contrast": c.label,
                "vector_norm": float(vectors[c.label].norm()),
                "self_effect": float(S[i, i]),
                "self_p": float(p[i, i]) if p is not None else None,
                **{f"self_p_{k}": float(pk[i, i]) for k, pk in p_kind.items()},
                **{
                    ("random_self_effect_mean" + ("" if k == "isotropic" else f"_{k}")): (
                        float(r[i, :, i].mean()) if m else None
                    )
                    for k, r in R.items()
                },
                "largest_other_set_effect": float(S[i, worst]) if worst is not None else None,
                "largest_other_set": labels[worst] if worst is not None else None,
                "largest_other_p": float(p[i, worst])
                if (p is not None and worst is not None)
                else None,
                "separable": bool(
                    p is not None
                    and p[i, i] < alpha
                    and (
                        worst is None
                        or p[i, worst] >= alpha
                        or abs(S[i, worst]) < 0.5 * abs(S[i, i])
                    )
                ),
            }
        )
    return {
        "hook": hook,
        "read_hook": read_hook,
        "scale": scale,
        "labels": labels,
        "matrix": S.tolist(),
        "p": p.tolist() if p is not None else None,
        "p_by_kind": {k: v.tolist() for k, v in p_kind.items()},
        "p_floor": p_floor(n * m * n) if m else None,
        "random_directions": {k: NULL_WHAT[k] for k in R},
        "random_control_matrix_mean": R["isotropic"].mean(1).tolist() if m else None,
        "random_control_matrix_mean_covariance": R["covariance"].mean(1).tolist() if m else None,
        "random_abs_effect_q95": {
            k: float(torch.quantile(r.abs().flatten(), 0.95)) for k, r in R.items() if m
        },
        "n_random_per_contrast": m,
        "probe_heldout_accuracy": accs,
        "clean_gap": gaps,
        "rows": rows,
        "n_docs": len(docs),
        "rule": "separable: self effect beats both random-direction nulls (the larger p < alpha) "
        "and the largest effect on another set's contrast is not significant or under half the "
        "self effect",
    }


def run(cfg, ctx: RelationsContext) -> dict[str, Any]:
    """Separability matrix at every hook (`SeparabilityConfig`), read `read_offset` layers later."""
    c = settings(cfg, SeparabilityConfig)
    specs = [Contrast.parse(s) for s in (c.contrasts or DEFAULT_CONTRASTS)]
    contrasts, skipped = harvested_only(
        [(x.label, (x.set,), x) for x in specs],
        ctx.concepts,
        explicit=c.contrasts is not None,
        what="contrast",
    )
    out: dict[str, Any] = {}
    for hook in ctx.hooks:
        read_hook = c.read_hook or resid_post_after(hook, c.read_offset, ctx.model.cfg.n_layers)
        out[hook] = separability(
            ctx.model,
            ctx.concepts,
            hook,
            read_hook,
            contrasts or None,  # none of the defaults harvested: every set's own contrasts
            scale=c.scale,
            n_random=c.n_random,
            seed=ctx.seed,
            alpha=c.alpha,
        )
    return {"by_hook": out, "contrasts_skipped": skipped}
