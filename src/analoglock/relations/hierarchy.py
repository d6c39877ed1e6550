"""Hierarchy: what tells a lion from a tiger from a bear, and what makes them all animals.

Owns the decomposition of a hierarchical contrast set (species classes plus one generic class,
e.g. animals: lion/tiger/bear + animal) at a hook into
  shared  = mean of the species means (the "animal" part they have in common),
  delta_s = species mean - shared (species-specific, summing to zero over species),
  generic = mean of the generic class - shared (what the word "animal" adds or lacks),
  animal direction = shared - mean of a reference set's concept tokens (non-animals),
with cosines tested against shuffled labels; held-out accuracies of species vs
species, species vs generic and animal vs reference; the features of a basis (given, or an SVD fit
on the harvested concept rows) that separate each species, ranked by effect size with a
max-statistic permutation p-value; and each top feature's measured effect: ablate it to the other
species' mean code at the concept tokens and read the species probe at a later layer, beside
edits of the same size (per concept token, the norm the ablation changes it by) along random
directions, isotropic and drawn from the concept rows' covariance; and, with `analoglock.patching`, the upstream features (an SVD a
few layers earlier) whose exact ablation moves those top features, beside random-direction controls.
Knows nothing of reports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from analoglock.hooks import hook_layer, resid_post_after
from analoglock.relations.algebra import shuffle_labels
from analoglock.relations.common import basis_at, concept_rows, svd_basis
from analoglock.relations.concepts import HELDOUT, forward_concepts
from analoglock.relations.config import HierarchyConfig, settings
from analoglock.relations.context import ConceptActs, RelationsContext
from analoglock.relations.vectors import (
    balanced_accuracy,
    concept_vectors,
    fit_probe,
    projection_accuracy,
)
from analoglock.stats import NULL_KINDS, NULL_WHAT, empirical_p, null_directions

log = logging.getLogger(__name__)


def decompose(
    x: Tensor, species: Sequence[int], generic: int, ref_mean: Tensor | None
) -> dict[str, Tensor]:
    """shared, per-species deltas, generic offset and (with a reference) the animal direction."""
    means = x.double().mean(0)  # [k, d]
    shared = means[list(species)].mean(0)
    out = {"shared": shared, "generic": means[generic] - shared}
    for s in species:
        out[f"delta:{s}"] = means[s] - shared
    if ref_mean is not None:
        out["animal"] = shared - ref_mean.double()
    return out


def _cos(a: Tensor, b: Tensor) -> float:
    """Cosine of two vectors."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def structure_stats(
    x: Tensor,
    classes: Sequence[str],
    species: Sequence[str],
    generic: str,
    ref_mean: Tensor | None,
    n_null: int,
    gen: torch.Generator,
) -> list[dict[str, Any]]:
    """Named cosines of the decomposition, each with a shuffled-label null (two-sided)."""
    si = [classes.index(s) for s in species]
    gi = classes.index(generic)

    def stats(t: Tensor) -> dict[str, float]:
        dec = decompose(t, si, gi, ref_mean)
        out = {}
        for a_i, a in zip(si, species, strict=True):
            for b_i, b in zip(si, species, strict=True):
                if a < b:
                    out[f"cos(delta {a}, delta {b})"] = _cos(
                        dec[f"delta:{a_i}"], dec[f"delta:{b_i}"]
                    )
            out[f"cos(delta {a}, generic offset)"] = _cos(dec[f"delta:{a_i}"], dec["generic"])
            if "animal" in dec:
                out[f"cos(delta {a}, animal direction)"] = _cos(dec[f"delta:{a_i}"], dec["animal"])
        if "animal" in dec:
            out["cos(generic offset, animal direction)"] = _cos(dec["generic"], dec["animal"])
        return out

    obs = stats(x)
    null = [stats(shuffle_labels(x, gen)) for _ in range(n_null)]
    rows = []
    for k, v in obs.items():
        nl = torch.tensor([n[k] for n in null])
        rows.append(
            {
                "measure": k,
                "value": v,
                "null_mean": float(nl.mean()),
                "null_sd": float(nl.std()),
                "p": empirical_p(abs(v - float(nl.mean())), (nl - nl.mean()).abs()),
            }
        )
    return rows


DEFAULT_N_FEATURES = 64  # SVD directions fit on the concept rows when no basis is given


def cohens_d(a: Tensor, b: Tensor) -> Tensor:
    """Cohen's d per column (pooled sd), a and b [n, F]."""
    a, b = a.double(), b.double()
    sd = ((a.var(0) + b.var(0)) / 2).sqrt().clamp_min(1e-9)
    return (a.mean(0) - b.mean(0)) / sd


def feature_effects(
    codes: Tensor,
    tr: Tensor,
    te: Tensor,
    pos: int,
    negs: Sequence[int],
    top_k: int,
    n_perm: int,
    gen: torch.Generator,
) -> list[dict[str, Any]]:
    """Top features by |Cohen's d| of class pos vs the item-wise mean of negs (train), with held-out d
    and a max-|d| permutation p-value (labels shuffled across the rows of pos + negs)."""
    cols = [pos, *negs]

    def d_of(c: Tensor) -> Tensor:
        return cohens_d(c[:, 0], c[:, 1:].mean(1))

    sub = codes[:, cols]
    d_tr = d_of(sub[tr])
    d_te = d_of(sub[te])
    null_max = torch.stack([d_of(shuffle_labels(sub[tr], gen)).abs().max() for _ in range(n_perm)])
    order = torch.argsort(d_tr.abs(), descending=True)[:top_k]
    return [
        {
            "feature": int(f),
            "d_train": float(d_tr[f]),
            "d_heldout": float(d_te[f]),
            "p_maxstat": empirical_p(float(d_tr[f].abs()), null_max),
            "mean_code_pos": float(sub[tr, 0, f].mean()),
            "mean_code_neg": float(sub[tr, 1:, f].mean()),
        }
        for f in order.tolist()
    ]


def _ablation_delta(basis, x: Tensor, feature: int, target: float) -> Tensor:
    """decode(c') - decode(c): the change that sets one feature's code to `target`."""
    c = basis.encode(x.float())
    c2 = c.clone()
    c2[..., feature] = target
    return basis.decode(c2) - basis.decode(c)


def ablate_feature_edit(basis, feature: int, target: float):
    """Edit setting one feature's code to `target` at concept tokens (x + decode(c') - decode(c))."""

    def edit(x: Tensor, cmask: Tensor, doc_idx: Tensor) -> Tensor:
        delta = _ablation_delta(basis, x, feature, target).to(x.dtype)
        return x + cmask[..., None].to(x.dtype) * delta

    return edit


def matched_norm_edit(basis, feature: int, target: float, directions: Tensor, n_docs: int):
    """The size-matched control of `ablate_feature_edit`: at each concept token, a random unit
    direction times the norm the ablation would change that token by. The documents are repeated
    once per direction; document i takes directions[i // n_docs]."""

    def edit(x: Tensor, cmask: Tensor, doc_idx: Tensor) -> Tensor:
        size = _ablation_delta(basis, x, feature, target).norm(dim=-1, keepdim=True)
        u = directions.to(x.device)[doc_idx.to(x.device) // n_docs][:, None, :]
        return x + cmask[..., None].to(x.dtype) * (size * u).to(x.dtype)

    return edit


def species_ablations(
    model,
    ca: ConceptActs,
    hook: str,
    read_hook: str,
    basis,
    species: Sequence[str],
    top: dict[str, list[dict[str, Any]]],
    codes: Tensor,
    n_control: int,
    gen: torch.Generator,
    probe_steps: int,
) -> dict[str, Any]:
    """Per species: ablate each top feature (to the other species' train mean code) on held-out docs of
    that species and measure the drop of the species probe readout at `read_hook`, in class gaps,
    beside `n_control` edits of the same size per concept token along random directions of each
    kind (isotropic; drawn from the covariance of the set's concept rows at `hook`)."""
    tr, te = ca.split_mask("train"), ca.split_mask(*HELDOUT)
    k = len(ca.classes)
    clean = forward_concepts(model, ca.docs, [read_hook], ca.pool)[read_hook].reshape(
        ca.n_items, k, -1
    )
    x_hook = ca.items_tensor(hook)
    space = ca.stacked(hook)[0]
    out = {}
    for s in species:
        si = ca.classes.index(s)
        others = [ca.classes.index(o) for o in species if o != s]
        n_tr = int(tr.sum())
        x = torch.cat([clean[tr, si], clean[tr][:, others].mean(1)])
        y = torch.cat([torch.ones(n_tr), torch.zeros(n_tr)]).long()
        probe = fit_probe(x, y, 2, steps=probe_steps)

        def score(rows: Tensor, probe=probe) -> Tensor:
            lg = probe.logits(rows.reshape(-1, rows.shape[-1]))
            return (lg[:, 1] - lg[:, 0]).reshape(rows.shape[:-1])

        real_neg = clean[te][:, others].reshape(-1, clean.shape[-1])
        acc = balanced_accuracy(
            probe.predict(torch.cat([clean[te, si], real_neg])),
            torch.cat([torch.ones(int(te.sum())), torch.zeros(len(real_neg))]).long(),
        )
        clean_gap = float(score(clean[te, si]).mean() - score(real_neg).mean())
        gap = max(abs(clean_gap), 1e-9)
        docs = [ca.docs[i * k + si] for i in range(ca.n_items) if bool(te[i])]
        base = float(score(clean[te, si]).mean())
        feats = []
        for t in top[s]:
            f = t["feature"]
            target = float(codes[tr][:, others, f].mean())
            edit = ablate_feature_edit(basis, f, target)
            rows = forward_concepts(model, docs, [read_hook], ca.pool, hook, edit)[read_hook]
            effect = (float(score(rows).mean()) - base) / gap
            norm = _ablation_delta(basis, x_hook[te, si], f, target).norm(dim=-1).mean()
            row = dict(t, ablation_effect_in_gaps=effect, edit_norm_mean=float(norm))
            row["random_equal_norm"] = {}
            for kind in NULL_KINDS if n_control > 0 else ():
                u = null_directions(kind, n_control, space, gen).float()
                ctrl_edit = matched_norm_edit(basis, f, target, u, len(docs))
                rows = forward_concepts(
                    model, docs * n_control, [read_hook], ca.pool, hook, ctrl_edit
                )[read_hook].reshape(n_control, len(docs), -1)
                ctrl = (score(rows).mean(1) - base) / gap
                row["random_equal_norm"][kind] = {
                    "effects_in_gaps": ctrl.tolist(),
                    "mean_abs": float(ctrl.abs().mean()),
                    "p": empirical_p(abs(effect), ctrl.abs()),
                }
            feats.append(row)
        out[s] = {
            "probe_heldout_accuracy": acc,
            "clean_gap": clean_gap,
            "features": feats,
            "n_docs": len(docs),
        }
    return out


def upstream_drivers(
    model,
    ca: ConceptActs,
    hook: str,
    basis,
    species: Sequence[str],
    top: dict[str, list[dict[str, Any]]],
    offset: int = 4,
    n_upstream: int = 32,
    top_n: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Per species: the upstream features (an SVD at `offset` layers earlier, fit on the set's
    concept rows) whose ablation most changes that species' top features at `hook`, measured
    exactly with `analoglock.patching` on the species' held-out sentences (ablated at every
    position, measured at the concept word's last token), beside its random-direction control."""
    from analoglock.activations import harvest
    from analoglock.patching import Ablate, Segment, build_prompts, clean_runs, exact_effects
    from analoglock.patching.segment import PatchSetupError
    from analoglock.positions import SpanTokens
    from analoglock.relations.concepts import ConceptTokens, pool_rows

    layer = hook_layer(hook)
    if layer is None or layer - offset < 0:
        return {"available": False, "note": f"no layer {offset} blocks before {hook}"}
    h1 = f"blocks.{layer - offset}.hook_resid_post"
    try:
        seg = Segment(model, h1, hook)
    except PatchSetupError as err:
        return {"available": False, "note": f"patching cannot run {h1} -> {hook}: {err}"}
    acts = harvest(model, ca.docs, [h1], ConceptTokens(), progress=False)
    rows = pool_rows(acts, len(ca.docs), ca.pool)[h1]
    up = svd_basis(rows, n_upstream, h1)
    te = ca.split_mask(*HELDOUT)
    k = len(ca.classes)
    measure = SpanTokens(labels=["concept"], which="last") if ca.docs[0].spans else None
    out: dict[str, Any] = {"available": True, "upstream_hook": h1, "upstream_basis": f"svd{up.n_features} fit on {ca.name} concept rows at {h1}", "intervention": "ablate (alpha 1) at every position", "species": {}}  # fmt: skip
    for s in species:
        si = ca.classes.index(s)
        docs = [ca.docs[i * k + si] for i in range(ca.n_items) if bool(te[i])]
        cleans = clean_runs(seg, build_prompts(model, docs, None, measure), progress=False)
        feats = [t["feature"] for t in top[s]]
        eff = exact_effects(seg, cleans, up, basis, Ablate(1.0), downstream_ids=feats, seed=seed, progress=False)  # fmt: skip
        per = []
        for j, f in enumerate(feats):
            col, ctrl = eff.effect[:, j], eff.control[:, j]
            order = torch.argsort(col.abs(), descending=True)[:top_n].tolist()
            per.append(
                {
                    "feature": f,
                    "drivers": [
                        {
                            "upstream": int(eff.upstream[i]),
                            "effect": float(col[i]),
                            "control": float(ctrl[i]),
                        }
                        for i in order
                    ],  # fmt: skip
                    "control_abs_q95": float(torch.quantile(ctrl.abs().double(), 0.95)),
                }
            )
        out["species"][s] = per
    return out


def hierarchy(
    model,
    concepts: dict[str, ConceptActs],
    hook: str,
    read_hook: str,
    set_name: str = HierarchyConfig.set,
    generic: str = HierarchyConfig.generic,
    reference: Sequence[str] = (),
    basis=None,
    top_k: int = HierarchyConfig.top_k,
    n_null: int = HierarchyConfig.n_null,
    n_control: int = HierarchyConfig.n_control,
    seed: int = 0,
    probe_steps: int = 100,
    upstream_offset: int = HierarchyConfig.upstream_offset,
) -> dict[str, Any]:
    """The hierarchy report for one set at one hook (see module docstring)."""
    if set_name not in concepts:
        raise ValueError(f"hierarchy: set {set_name!r} not harvested; have {', '.join(concepts)}")
    ca = concepts[set_name]
    if generic not in ca.classes:
        raise ValueError(
            f"hierarchy: generic class {generic!r} is not a class of {set_name} ({', '.join(ca.classes)})"
        )
    species = [c for c in ca.classes if c != generic]
    if len(species) < 2:
        raise ValueError(f"hierarchy: {set_name} needs >= 2 specific classes besides {generic!r}")
    gen = torch.Generator().manual_seed(seed)
    x = ca.items_tensor(hook)
    tr, te = ca.split_mask("train"), ca.split_mask(*HELDOUT)
    refs = [r for r in reference if r in concepts and r != set_name]
    ref_mean = None
    result: dict[str, Any] = {
        "set": set_name,
        "hook": hook,
        "read_hook": read_hook,
        "species": species,
        "generic": generic,
        "reference": refs,
    }
    if refs:
        ref_rows_tr = torch.cat([concepts[r].stacked(hook, "train")[0] for r in refs])
        ref_mean = ref_rows_tr.double().mean(0)
        direction = (x[tr].double().mean((0, 1)) - ref_mean).float()
        ref_te = torch.cat(
            [torch.cat([concepts[r].stacked(hook, s)[0] for s in HELDOUT]) for r in refs]
        )
        an_tr, an_te = x[tr].reshape(-1, x.shape[-1]), x[te].reshape(-1, x.shape[-1])
        xtr = torch.cat([an_tr, ref_rows_tr])
        ytr = torch.cat([torch.ones(len(an_tr)), torch.zeros(len(ref_rows_tr))]).long()
        xte = torch.cat([an_te, ref_te])
        yte = torch.cat([torch.ones(len(an_te)), torch.zeros(len(ref_te))]).long()
        acc = projection_accuracy(direction, xtr, ytr, xte, yte)
        rand = {
            kind: torch.tensor(
                [
                    projection_accuracy(r.float(), xtr, ytr, xte, yte)
                    for r in null_directions(kind, 200, xtr, gen)
                ]
            )
            for kind in NULL_KINDS
        }
        result["animal_direction"] = {
            "norm": float(direction.norm()),
            "heldout_accuracy_vs_reference": acc,
            "random_direction_accuracy_mean": float(rand["isotropic"].mean()),
            "p_random": empirical_p(acc, rand["isotropic"]),
            "random_covariance_accuracy_mean": float(rand["covariance"].mean()),
            "p_random_covariance": empirical_p(acc, rand["covariance"]),
            "random_directions": {k: NULL_WHAT[k] for k in NULL_KINDS},
            "note": "reference sets differ in template content too; the direction mixes 'animal' with "
            "whatever else separates those sentences",
        }
    dec = decompose(x, [ca.classes.index(s) for s in species], ca.classes.index(generic), ref_mean)
    result["norms"] = {
        "shared": float(dec["shared"].norm()),
        "generic_offset": float(dec["generic"].norm()),
        **{f"delta {s}": float(dec[f"delta:{ca.classes.index(s)}"].norm()) for s in species},
    }
    result["structure"] = structure_stats(x, ca.classes, species, generic, ref_mean, n_null, gen)
    acc = {}
    for s in species:
        others = [o for o in species if o != s]
        for neg, name in ((others, f"{s} vs other species"), (generic, f"{s} vs {generic}")):
            cv = concept_vectors(
                ca, hook, s, neg, n_null=min(n_null, 50), seed=seed, probe_steps=probe_steps
            )
            m = cv["methods"]["mean_diff"]
            acc[name] = {
                "heldout_accuracy": m["heldout_accuracy"],
                "shuffled_mean": m["shuffled_labels"].get("mean"),
                "p_shuffled": m["p_shuffled"],
                "probe_heldout_accuracy": cv["methods"]["probe"]["heldout_accuracy"],
            }
    result["accuracy"] = acc
    own_basis = basis_at(basis, hook) is None
    if own_basis:
        basis = svd_basis(concept_rows(concepts, hook), DEFAULT_N_FEATURES, hook)
    result["basis"] = {
        "kind": basis.kind,
        "n_features": basis.n_features,
        "source": "SVD fit on the harvested concept rows" if own_basis else "given",
    }
    codes = basis.encode(x.float()).detach()
    top = {}
    for s in species:
        si = ca.classes.index(s)
        others = [ca.classes.index(o) for o in species if o != s]
        top[s] = feature_effects(codes, tr, te, si, others, top_k, n_null, gen)
    result["generic_features"] = {
        s: feature_effects(
            codes, tr, te, ca.classes.index(s), [ca.classes.index(generic)], top_k, n_null, gen
        )
        for s in species
    }
    result["species_features"] = species_ablations(
        model, ca, hook, read_hook, basis, species, top, codes, n_control, gen, probe_steps
    )
    result["upstream"] = (
        upstream_drivers(model, ca, hook, basis, species, top, upstream_offset, seed=seed)
        if upstream_offset > 0
        else {"available": False, "note": "upstream_offset=0: skipped"}
    )
    return result


def run(cfg, ctx: RelationsContext) -> dict[str, Any]:
    """Hierarchy report at every hook for the configured set (`HierarchyConfig`)."""
    c = settings(cfg, HierarchyConfig)
    out = {}
    for hook in ctx.hooks:
        out[hook] = hierarchy(
            ctx.model,
            ctx.concepts,
            hook,
            c.read_hook or resid_post_after(hook, c.read_offset, ctx.model.cfg.n_layers),
            set_name=c.set,
            generic=c.generic,
            reference=list(c.reference),
            basis=ctx.basis,
            top_k=c.top_k,
            n_null=c.n_null,
            n_control=c.n_control,
            upstream_offset=c.upstream_offset,
            seed=ctx.seed,
        )
    return {"by_hook": out}
