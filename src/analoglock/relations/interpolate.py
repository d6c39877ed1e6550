"""Interpolation between unrelated inputs: commonalities, tangents, and which commonalities are abstract.

Owns the analysis: which paths are run (between two inputs at each interpolation hook, in each
mode, and between two relation vectors added to an input), their controls (shuffled-token and
random-token inputs of the same lengths; random relation vectors of the same norms, isotropic and
drawn from the activations' covariance), the counts of commonalities and tangents beside those
controls, and the abstract / superficial split: a commonality of (A, B) is abstract when it is
also a commonality of (A', B'), their paraphrases with no content word in common with A or B
(`text.load_paraphrases`); superficial otherwise. The control is the same test against the
paraphrases of a different pair. The path machinery and the definitions live in paths.py, the
text rules in text.py; figures in `analoglock.reports.relation_paths`.

Features are those of a basis (by default an SVD fit on the reference texts, split into signed
halves), pooled as the mean over the non-BOS positions and z-scored against the reference texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.data import StoryPair, available_datasets, load_documents, load_pairs
from analoglock.hooks import block_hook
from analoglock.hooks import residual_depth as hook_depth
from analoglock.relations.common import basis_at, text_basis, text_rows
from analoglock.relations.config import InterpolateConfig, settings
from analoglock.relations.paths import (
    MODES,
    FeatureReader,
    IncompatibleHookError,
    check_read_after,
    commonalities,
    default_hooks,
    doc_activity,
    input_path,
    interpolate,
    relation_path,
    residual_depth,
    step_grid,
)
from analoglock.relations.text import (
    CONTROLS,
    DEFAULT_PAIRS,
    DEFAULT_PARAPHRASES,
    control_inputs,
    encode,
    equal_length,
    load_paraphrases,
    n_prefix,
)
from analoglock.stats import (
    NULL_KINDS,
    bootstrap_indices,
    empirical_p,
    null_directions,
    p_floor,
    percentile_interval,
)

BASIS_FITS = ("reference", "inputs")  # what the default SVD basis is fit on
DEFAULT_REFERENCE = (
    InterpolateConfig.reference
)  # Aesop fables: unrelated to vacations and deadlines
LENGTH_RULE = (
    "both inputs truncated to the shorter one's token count (BOS kept), so every position holds a "
    "real token of each input and the endpoints are the truncated inputs themselves"
)
RELATION_CONTROLS = {"isotropic": "random_vectors", "covariance": "covariance_vectors"}


def control_stats(main: int, counts: list[int]) -> dict[str, Any]:
    """A count beside its control counts: mean, max, and the fraction of controls >= it."""
    return {
        "main": main,
        "control_counts": counts,
        "control_mean": sum(counts) / len(counts) if counts else None,
        "control_max": max(counts) if counts else None,
        "p_control_ge": empirical_p(main, torch.tensor(counts, dtype=torch.float64)),
        "p_floor": p_floor(len(counts)),
    }


def _drop_z(rec: dict[str, Any]) -> dict[str, Any]:
    """A control path's record without its bulky per-step matrices."""
    return {k: v for k, v in rec.items() if k not in ("z", "lens_top_tokens")}


# ---------------------------------------------------------------- abstract vs superficial


def rate_difference_interval(rows: list[dict], seed: int = 0, n_boot: int = 2000) -> dict:
    """Abstract rate minus its control rate, with a 95% bootstrap interval over pairs: both rates
    are over the same commonalities, so one resample of pairs serves both (a paired interval)."""
    counts = torch.tensor(
        [
            [len(r["abstract"]) + len(r["superficial"]), len(r["abstract"]),
             len(r["abstract_under_control"])]
            for r in rows
        ],
        dtype=torch.float64,
    )  # fmt: skip
    sums = counts[bootstrap_indices(len(rows), n_boot, seed)].sum(1)  # [n_boot, 3]
    diff = (sums[:, 1] - sums[:, 2]) / sums[:, 0]  # NaN where a resample has no commonality
    total = counts.sum(0)
    point = float((total[1] - total[2]) / total[0]) if total[0] else float("nan")
    return {
        "abstract_rate_minus_control": point,
        "abstract_rate_minus_control_ci95": list(percentile_interval(diff)),
        "interval": f"95% percentile bootstrap over the {len(rows)} pairs, {n_boot} resamples",
    }


def classify_commonalities(
    model,
    reader: FeatureReader,
    pairs: Sequence[tuple[StoryPair, StoryPair]],
    theta: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Abstract vs superficial commonalities over (original, paraphrase) pairs, with the
    mismatched-paraphrase control (pair i tested against pair j's paraphrases, j != i)."""
    if len(pairs) < 2:
        raise ValueError(
            "Classifying commonalities needs at least 2 paraphrased pairs (1 for the control)"
        )
    texts = [s for orig, para in pairs for s in (orig.a, orig.b, para.a, para.b)]
    z = reader.z(doc_activity(model, reader, texts)).reshape(len(pairs), 4, -1)
    n = len(pairs)
    gen = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(1, n, (1,), generator=gen))  # a derangement: i -> i + shift mod n
    rows, per_feature = [], {name: [0, 0, 0] for name in reader.names}
    tot = {"n_commonalities": 0, "n_abstract": 0, "n_superficial": 0, "n_abstract_control": 0}
    for i, (orig, para) in enumerate(pairs):
        com = set(commonalities(z[i, 0], z[i, 1], theta))
        kept = set(commonalities(z[i, 2], z[i, 3], theta))
        j = (i + shift) % n
        kept_ctrl = set(commonalities(z[j, 2], z[j, 3], theta))
        abstract, superficial, abstract_ctrl = com & kept, com - kept, com & kept_ctrl
        for slot, feats in enumerate((abstract, superficial, abstract_ctrl)):
            for f in feats:
                per_feature[reader.names[f]][slot] += 1
        tot["n_commonalities"] += len(com)
        tot["n_abstract"] += len(abstract)
        tot["n_superficial"] += len(superficial)
        tot["n_abstract_control"] += len(abstract_ctrl)
        rows.append(
            {
                "pair": orig.id,
                "paraphrase": para.id,
                "control_paraphrase": pairs[j][1].id,
                "abstract": sorted(reader.names[f] for f in abstract),
                "superficial": sorted(reader.names[f] for f in superficial),
                "abstract_under_control": sorted(reader.names[f] for f in abstract_ctrl),
                "paraphrase_commonalities": len(kept),
            }
        )
    c = tot["n_commonalities"]
    return {
        "theta": theta,
        "n_pairs": n,
        **tot,
        "abstract_rate": tot["n_abstract"] / c if c else None,
        "abstract_rate_control": tot["n_abstract_control"] / c if c else None,
        **rate_difference_interval(rows, seed),
        "control": "each pair's commonalities tested against the paraphrases of a different pair",
        "per_pair": rows,
        "per_feature": {
            k: {"abstract": v[0], "superficial": v[1], "abstract_under_control": v[2]}
            for k, v in per_feature.items()
            if any(v)
        },
    }


# ---------------------------------------------------------------- the analysis


def _reference_texts(name: str, n: int) -> list[str]:
    """`n` texts of a shipped dataset (pairs: side a) to z-score features against."""
    is_pairs = name in available_datasets()["pairs"]
    docs = load_documents(name, side="a") if is_pairs else load_documents(name)
    texts = [d.text for d in docs][: int(n)]
    if len(texts) < 2:
        raise ValueError(f"Reference {name!r} gave {len(texts)} texts; need at least 2")
    return texts


def analyze_interpolation(
    model,
    hooks: Sequence[str] | str | None = None,
    text_a: str | None = None,
    text_b: str | None = None,
    *,
    read_hook: str | None = None,
    basis=None,
    n_features: int = InterpolateConfig.n_features,
    basis_fit: str = InterpolateConfig.basis_fit,
    n_steps: int = InterpolateConfig.n_steps,
    modes: Sequence[str] = MODES,
    controls: Sequence[str] = CONTROLS,
    n_controls: int = InterpolateConfig.n_controls,
    theta: float = InterpolateConfig.theta,
    margin: float = InterpolateConfig.margin,
    reference: str | Sequence[str] = DEFAULT_REFERENCE,
    n_reference: int = InterpolateConfig.n_reference,
    paraphrases: str | None = DEFAULT_PARAPHRASES,
    relation_a: Tensor | None = None,
    relation_b: Tensor | None = None,
    relation_hook: str | None = None,
    relation_names: tuple[str, str] = ("relation_a", "relation_b"),
    top_k: int = InterpolateConfig.top_k,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Interpolate between two inputs (default: the first vacation/deadline pair) at each hook
    (hook_embed = token-embedding space) and between two relation vectors; report commonalities
    and tangents beside control paths, and which commonalities survive paraphrasing.

    `basis` is any FeatureBasis fit at `read_hook`; without one, an SVDBasis of `n_features` is fit
    at `read_hook` on `basis_fit`: "reference" (default: the reference texts, which neither the
    main nor the control inputs are) or "inputs" (the two inputs; their features then favour the
    main path over its controls). `reference` is a shipped dataset name or a list of texts.
    """
    t = step_grid(n_steps)
    for m in modes:
        interpolate(torch.zeros(1), torch.zeros(1), t[:1], m)  # validates the name
    bad = [c for c in controls if c not in CONTROLS]
    if bad:
        raise ValueError(f"Unknown controls {bad}; valid: {', '.join(CONTROLS)}")
    if (relation_a is None) != (relation_b is None):
        raise ValueError("Give both relation_a and relation_b (or neither)")
    d_hooks, d_read = default_hooks(model)
    hooks = [hooks] if isinstance(hooks, str) else list(hooks or d_hooks)
    read_hook = read_hook or d_read
    rel_hook = relation_hook or (hooks[-1] if hooks[-1] != "hook_embed" else d_hooks[1])
    check_read_after(model, hooks + ([rel_hook] if relation_a is not None else []), read_hook)
    if text_a is None or text_b is None:
        if text_a is not None or text_b is not None:
            raise ValueError("Give both text_a and text_b (or neither for the default pair)")
        pair = load_pairs(DEFAULT_PAIRS)[0]
        text_a, text_b, source = pair.a, pair.b, pair.id
    else:
        source = "user"
    if basis is not None and getattr(basis, "hook", "") and basis.hook != read_hook:
        raise IncompatibleHookError(
            f"The basis was fit at {basis.hook!r}, but features are read at {read_hook!r}; "
            f"pass read_hook={basis.hook!r} or a basis fit there."
        )
    if basis_fit not in BASIS_FITS:
        raise ValueError(f"Unknown basis_fit {basis_fit!r}; valid: {', '.join(BASIS_FITS)}")
    skip = n_prefix(model)
    ref_texts = (
        _reference_texts(reference, n_reference) if isinstance(reference, str) else list(reference)
    )
    basis_source = "given"
    if basis is None:
        fit_texts = ref_texts if basis_fit == "reference" else [text_a, text_b]
        basis = text_basis(model, fit_texts, read_hook, n_features)
        basis_source = f"every non-BOS token of the {basis_fit} texts at read_hook"
    probe = torch.randn(64, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    signed = bool((basis.encode(probe) < 0).any())  # signed codes get split into +/- halves
    reader = FeatureReader(basis, read_hook, skip, signed)
    reader.calibrate(doc_activity(model, reader, ref_texts))

    full_a, full_b = encode(model, text_a), encode(model, text_b)
    ids_a, ids_b = equal_length(full_a, full_b)
    pool = torch.tensor(
        sorted({int(i) for txt in ref_texts for i in encode(model, txt)[skip:]}), dtype=torch.long
    )
    gen = torch.Generator().manual_seed(int(seed))
    control_ids = {
        kind: [control_inputs(kind, ids_a, ids_b, skip, pool, gen) for _ in range(int(n_controls))]
        for kind in controls
    }
    jobs = [(h, m) for h in hooks for m in modes]
    paths, summary = [], []
    for hook, mode in tqdm(jobs, desc="interpolation paths", disable=not progress):
        main = input_path(model, reader, ids_a, ids_b, hook, mode, t, theta, margin, top_k)
        space = "embed" if residual_depth(model, hook) == 0 else "resid"
        main.update(space=space, hook=hook, mode=mode, kind="main")
        paths.append(main)
        counts: dict[str, dict[str, list[int]]] = {}
        for kind, inputs in control_ids.items():
            c = counts.setdefault(kind, {"commonalities": [], "tangents": []})
            for k, (ca, cb) in enumerate(inputs):
                rec = input_path(model, reader, ca, cb, hook, mode, t, theta, margin, top_k)
                rec.update(hook=hook, mode=mode, kind=kind, control_index=k)
                paths.append(_drop_z(rec))
                c["commonalities"].append(rec["n_commonalities"])
                c["tangents"].append(rec["n_tangents"])
        summary.append(
            {"hook": hook, "mode": mode}
            | {
                what: {k: control_stats(main[f"n_{what}"], v[what]) for k, v in counts.items()}
                for what in ("commonalities", "tangents")
            }
        )
    result: dict[str, Any] = {
        "inputs": {
            "source": source,
            "a": text_a,
            "b": text_b,
            "tokens_a": len(full_a),
            "tokens_b": len(full_b),
            "tokens_used": len(ids_a),
            "length_rule": LENGTH_RULE,
        },
        "hooks": hooks,
        "read_hook": read_hook,
        "basis": {
            "kind": basis.kind,
            "n_features": basis.n_features,
            "signed_halves": signed,
            "fit_on": basis_source,
        },
        "features": reader.names,
        "steps": t.tolist(),
        "theta": theta,
        "margin": margin,
        "reference": {
            "source": reference if isinstance(reference, str) else "user",
            "n_texts": len(ref_texts),
        },
        "controls": {
            "kinds": list(controls),
            "n_per_kind": int(n_controls),
            "shuffle": "each input's tokens permuted (BOS kept)",
            "random": "tokens drawn uniformly from the reference texts' vocabulary",
            "p": "p_control_ge = (1 + #controls with a count >= the main path's) / (1 + n); "
            f"its floor with n={int(n_controls)} is {p_floor(int(n_controls)):.3g}",
        },
        "paths": paths,
        "summary": summary,
    }
    if relation_a is not None:
        result["relation"] = _relation_analysis(
            model,
            reader,
            full_a,
            rel_hook,
            (relation_a, relation_b),
            relation_names,
            modes,
            t,
            (theta, margin, top_k),
            int(n_controls),
            text_rows(model, ref_texts, rel_hook),
            gen,
        )
    if paraphrases:
        result["abstract"] = classify_commonalities(
            model, reader, load_paraphrases(paraphrases), theta, seed
        )
    return result


def _relation_analysis(
    model, reader, ids, hook, relations, names, modes, t, thresholds, n_controls, rows, gen
) -> dict[str, Any]:
    """Relation-vector paths on one input, beside paths between random vectors of equal norms
    (isotropic, and drawn from the covariance of `rows`, the reference texts at `hook`)."""
    theta, margin, top_k = thresholds
    r_a, r_b = (torch.as_tensor(r).float().cpu() for r in relations)
    out: dict[str, Any] = {
        "hook": hook,
        "names": list(names),
        "norms": [float(r_a.norm()), float(r_b.norm())],
        "cosine": float(torch.nn.functional.cosine_similarity(r_a, r_b, dim=0)),
        "applied": "added at every text position of input a (BOS untouched)",
        "controls": {
            RELATION_CONTROLS[k]: f"pairs of random vectors with the relations' norms, {w}"
            for k, w in (
                ("isotropic", "isotropic"),
                ("covariance", "drawn from the covariance of the reference texts at the hook"),
            )
        },
        "paths": [],
        "summary": [],
    }
    controls = {}
    for kind in NULL_KINDS:
        u = null_directions(kind, 2 * n_controls, rows, gen).float()
        controls[RELATION_CONTROLS[kind]] = [
            (u[2 * k] * r_a.norm(), u[2 * k + 1] * r_b.norm()) for k in range(n_controls)
        ]
    for mode in modes:
        main = relation_path(model, reader, ids, hook, r_a, r_b, mode, t, theta, margin, top_k)
        main.update(mode=mode, kind="main")
        out["paths"].append(main)
        counts = {}
        for name, pairs in controls.items():
            com, tan = [], []
            for k, (ca, cb) in enumerate(pairs):
                rec = relation_path(model, reader, ids, hook, ca, cb, mode, t, theta, margin, top_k)
                rec.update(mode=mode, kind=name, control_index=k)
                out["paths"].append(_drop_z(rec))
                com.append(rec["n_commonalities"])
                tan.append(rec["n_tangents"])
            counts[name] = (com, tan)
        out["summary"].append(
            {
                "mode": mode,
                "commonalities": {
                    k: control_stats(main["n_commonalities"], c) for k, (c, _) in counts.items()
                },
                "tangents": {
                    k: control_stats(main["n_tangents"], tn) for k, (_, tn) in counts.items()
                },
            }
        )
    return out


# ---------------------------------------------------------------- runner


def _default_relations(ctx, hook: str) -> tuple[str, str] | None:
    """The first two harvested sets' class0-class1 relations, when there are two such sets."""
    specs = [
        f"{n}:{c.classes[0]}-{c.classes[1]}"
        for n, c in ctx.concepts.items()
        if len(c.classes) >= 2 and hook in c.hooks
    ]
    return (specs[0], specs[1]) if len(specs) >= 2 else None


def run(cfg: Any, ctx) -> dict[str, Any]:
    """`analoglock-relations analyses=[interpolate]`: analyze_interpolation from its section
    (`InterpolateConfig`); ctx.basis is used when it was fit at read_hook."""
    c = settings(cfg, InterpolateConfig)
    model = ctx.model
    read_hook = c.read_hook or default_hooks(model)[1]
    read_depth = residual_depth(model, read_hook)
    before = [h for h in ctx.hooks if block_hook(h) and hook_depth(h) is not None]
    rel_hook = c.relation_hook or next(  # the run's first block residual hook before read_hook
        (h for h in before if hook_depth(h) < read_depth), None
    )
    specs = c.relations
    if specs is None and rel_hook is not None and ctx.concepts:
        specs = _default_relations(ctx, rel_hook)
    rel: dict[str, Any] = {}
    if specs:
        if len(specs) != 2 or rel_hook is None:
            raise ValueError(
                "relations needs two specs ('set:a-b') and a residual relation_hook before read_hook"
            )
        rel = {
            "relation_a": ctx.relation(specs[0], rel_hook),
            "relation_b": ctx.relation(specs[1], rel_hook),
            "relation_hook": rel_hook,
            "relation_names": (specs[0], specs[1]),
        }
    kwargs = {
        k: getattr(c, k)
        for k in ("basis_fit", "hooks", "text_a", "text_b", "n_features", "n_steps", "modes")
        + ("controls", "n_controls", "theta", "margin", "reference", "n_reference", "top_k")
        if getattr(c, k) is not None
    }
    return analyze_interpolation(
        model,
        read_hook=read_hook,
        basis=basis_at(ctx.basis, read_hook, strict=True),
        paraphrases=c.paraphrases or None,
        seed=ctx.seed,
        **kwargs,
        **rel,
    )
