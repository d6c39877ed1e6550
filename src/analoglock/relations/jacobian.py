"""Rate of change of the model's output along a layer's singular directions.

Owns the analysis: the derivative of an output (next-token log-probabilities at the last position,
or one logit difference) along each direction of a basis at one hook, ranked, with its step
response classified, beside random unit directions of two kinds (isotropic, and drawn from the
covariance of the activations at that hook over the fit texts); each direction's rank among the
random ones and its ratio to their maximum (the mean is reported too, but a best-of-k direction
compared with a mean of random ones overstates it); and a cross-check of one number against
TransformerLens's `JacobianLens` fit. The derivative machinery and units are in derivatives.py;
figures in `analoglock.reports.relation_paths`. Knows nothing of concepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.hooks import block_hook, validate_hook
from analoglock.relations.common import basis_at, svd_basis, text_rows
from analoglock.relations.config import JacobianConfig, settings
from analoglock.relations.derivatives import (
    CLASSES,
    METRICS,
    classify_response,
    directional_derivative,
    output_head,
    perturbed_fn,
    text_response,
)
from analoglock.relations.text import default_texts, encode, n_prefix, single_token
from analoglock.stats import (
    NULL_KINDS,
    NULL_WHAT,
    covariance_directions,
    empirical_p,
    random_unit_directions,
)

DEFAULT_STEPS = tuple(JacobianConfig().steps)  # fractions of the mean norm of the perturbed acts


def encode_text(model, text: str, max_tokens: int | None) -> Tensor:
    """BOS + token ids truncated to max_tokens; refuses texts with no token to differentiate."""
    ids = encode(model, text, max_tokens)
    if len(ids) < 2:
        raise ValueError(f"Text {text!r} is too short to differentiate (needs >= 1 token)")
    return ids


def vs_random(size: float, random: Tensor) -> dict[str, float | int]:
    """One direction's size against random directions' sizes: ratio to their mean and maximum,
    rank among them (1 = above all) and the empirical p (rank / (n + 1))."""
    return {
        "ratio_to_mean": float(size / random.mean().clamp_min(1e-30)),
        "ratio_to_max": float(size / random.max().clamp_min(1e-30)),
        "rank": 1 + int((random >= size).sum()),
        "p": empirical_p(size, random),
    }


def analyze_jacobian(
    model,
    hook: str,
    texts: Sequence[str] | None = None,
    *,
    basis=None,
    fit_texts: Sequence[str] | None = None,
    n_directions: int = JacobianConfig.n_directions,
    n_random: int = JacobianConfig.n_random,
    steps: Sequence[float] = DEFAULT_STEPS,
    metric: str = JacobianConfig.metric,
    target_tokens: tuple[str, str] | None = None,
    positions: str | Sequence[int] = JacobianConfig.positions,
    method: str = JacobianConfig.method,
    tol: float = JacobianConfig.tol,
    max_tokens: int | None = JacobianConfig.max_tokens,
    batch_size: int = JacobianConfig.batch_size,
    crosscheck: bool = JacobianConfig.crosscheck,
    crosscheck_tokens: int = JacobianConfig.crosscheck_tokens,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Derivative of the output along each of a basis's directions at `hook`, ranked, with its
    step response classified, beside `n_random` random unit directions of each kind.

    `basis` defaults to an SVDBasis of `n_directions` fit at `hook` on `fit_texts` (default: the
    texts themselves plus the next vacation/deadline stories), whose activations also give the
    covariance of the "covariance" random directions. Directions are normalised to unit norm
    (their original norms are reported). `target_tokens` (two strings, one token each) turn the
    output into a logit difference.
    """
    validate_hook(model, hook)
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    steps = sorted(float(s) for s in steps)
    if not steps or steps[0] <= 0:
        raise ValueError(f"steps must be positive fractions of the activation norm, got {steps}")
    if int(n_random) < 1:
        raise ValueError("n_random must be >= 1: random directions are the control")
    texts = list(texts or default_texts())
    token_ids = None
    if metric == "logit_diff":
        token_ids = tuple(single_token(model, s) for s in (target_tokens or ()))
        if len(token_ids) != 2:
            raise ValueError("metric='logit_diff' needs target_tokens=(token_a, token_b)")
    head = output_head(metric, token_ids)
    rows = text_rows(model, list(fit_texts or texts + default_texts(12)[len(texts) :]), hook)
    if basis is None:
        basis = svd_basis(rows, n_directions, hook)
        basis_fit = "SVDBasis on every non-BOS token of the fit texts at the hook"
    else:
        basis_fit = "given"
        if getattr(basis, "hook", "") and basis.hook != hook:
            raise ValueError(f"The basis was fit at {basis.hook!r}, not at {hook!r}")
    raw = basis.directions.detach().float().cpu()[: int(n_directions)]
    if raw.shape[-1] != model.cfg.d_model:
        raise ValueError(
            f"Basis directions have width {raw.shape[-1]}, the model d_model={model.cfg.d_model}"
        )
    norms = raw.norm(dim=-1)
    dirs = raw / norms.clamp_min(1e-12)[:, None]
    gen = torch.Generator().manual_seed(int(seed))
    rand = {  # isotropic first, in float32: the same draws as before covariance ones were added
        "isotropic": random_unit_directions(int(n_random), model.cfg.d_model, gen, torch.float32),
        "covariance": covariance_directions(rows, int(n_random), gen).float(),
    }
    all_dirs = torch.cat([dirs, *rand.values()])
    per_text = []
    for text in tqdm(texts, desc="jacobian texts", disable=not progress):
        ids = encode_text(model, text, max_tokens)
        per_text.append(
            text_response(
                model, ids, hook, all_dirs, steps, head, metric, positions, method, batch_size
            )
        )
    n, m = len(dirs), int(n_random)
    fisher = torch.stack([r["fisher"] for r in per_text]).mean(0)  # [k]
    l2 = torch.stack([r["l2"] for r in per_text]).mean(0)
    ratios = torch.stack([r["ratios"] for r in per_text]).median(0).values  # [k, 2, n_steps]
    kl = torch.stack([r["kl"] for r in per_text]).mean(0)
    where = {kind: slice(n + j * m, n + (j + 1) * m) for j, kind in enumerate(NULL_KINDS)}
    classes = [
        [classify_response(ratios[i, s].tolist(), tol) for s in range(2)]
        for i in range(len(all_dirs))
    ]
    order = torch.argsort(fisher[:n], descending=True).tolist()
    size_name = "fisher_norm" if metric == "logprobs" else "abs_derivative"

    def side(x: Tensor, i: int) -> dict[str, list[float]]:
        return {"+": x[i, 0].tolist(), "-": x[i, 1].tolist()}

    directions = [
        {
            "index": i,
            "rank": r + 1,
            size_name: float(fisher[i]),
            "l2_norm": float(l2[i]),
            "vs_random": {k: vs_random(float(fisher[i]), fisher[sl]) for k, sl in where.items()},
            "direction_norm": float(norms[i]),
            "singular_value": _singular_value(basis, i),
            "response_ratio": side(ratios, i),
            "kl": side(kl, i) if metric == "logprobs" else None,
            "class": {"+": classes[i][0], "-": classes[i][1]},
        }
        for r, i in enumerate(order)
    ]

    def random_block(kind: str) -> dict[str, Any]:
        sl = where[kind]
        idx = range(sl.start, sl.stop)
        return {
            "kind": kind,
            "what": NULL_WHAT[kind],
            "n": m,
            f"mean_{size_name}": float(fisher[sl].mean()),
            f"max_{size_name}": float(fisher[sl].max()),
            "directions": [
                {size_name: float(fisher[j]), "response_ratio": side(ratios, j)}
                | {"class": {"+": classes[j][0], "-": classes[j][1]}}
                for j in idx
            ],
        }

    best = directions[0]
    result: dict[str, Any] = {
        "hook": hook,
        "metric": metric,
        "target_tokens": list(target_tokens) if target_tokens else None,
        "positions": positions if isinstance(positions, str) else list(positions),
        "size": size_name,
        "method": sorted({m for r in per_text for m in r["methods"]}),
        "basis": {"kind": basis.kind, "n_directions": n, "fit": basis_fit},
        "n_texts": len(texts),
        "max_tokens": max_tokens,
        "steps": steps,
        "step_unit": "fraction of the mean norm of the perturbed activations",
        "mean_activation_norm": sum(r["unit"] for r in per_text) / len(per_text),
        "tol": tol,
        "directions": directions,
        "random": random_block("isotropic"),
        "random_covariance": random_block("covariance"),
        "best": {
            "index": best["index"],
            size_name: best[size_name],
            "vs_random": best["vs_random"],
            "note": f"the largest of {n} basis directions against {m} random directions of each "
            "kind: ratio_to_max compares it with the largest of them (a like-for-like maximum); "
            "rank 1 means above all of them; ratio_to_mean overstates it",
        },
        "class_counts": {
            "singular": _class_counts(classes[:n]),
            **{
                ("random" if k == "isotropic" else f"random_{k}"): _class_counts(classes[sl])
                for k, sl in where.items()
            },
        },
        "smallest_step_ratio": {
            "singular_median": float(ratios[:n, :, 0].median()),
            "random_median": float(ratios[where["isotropic"], :, 0].median()),
            "random_covariance_median": float(ratios[where["covariance"], :, 0].median()),
        },
    }
    if crosscheck:
        # JacobianLens.fit costs d_model backward passes, so the cross-check uses a short prefix
        result["jlens_crosscheck"] = jlens_crosscheck(
            model, hook, texts[0], dirs[order[0]], crosscheck_tokens
        )
    return result


def _singular_value(basis, i: int) -> float | None:
    """The i-th singular value when the basis has them."""
    s = getattr(basis, "singular_values", None)
    return float(s[i]) if s is not None and i < len(s) else None


def _class_counts(classes: list[list[str]]) -> dict[str, dict[str, int]]:
    """How many directions fall in each class, per side."""
    return {
        side: {c: sum(1 for row in classes if row[s] == c) for c in CLASSES}
        for s, side in enumerate(("+", "-"))
    }


# ---------------------------------------------------------------- peer cross-check


def jlens_crosscheck(
    model, hook: str, text: str, direction: Tensor, max_tokens: int | None = 48, skip_first: int = 1
) -> dict[str, Any]:
    """J_l v from TransformerLens's JacobianLens.fit on one text vs the same quantity from our JVPs.

    J_l averages, over source positions s in V = skip_first .. n-2, the sum over targets t in V,
    t >= s, of d h_final[t] / d h_l[s]; we perturb position s alone, take the JVP of the final
    block output summed over V, and average over s. Applies to block outputs below the last layer.
    """
    where = block_hook(hook)
    n_layers = model.cfg.n_layers
    if where is None or where[1] not in ("hook_resid_post", "hook_out") or where[0] >= n_layers - 1:
        return {
            "applicable": False,
            "reason": "JacobianLens transports block outputs (blocks.<l>.hook_out = hook_resid_post) "
            f"for l < {n_layers - 1} to the final block output; {hook!r} is not one.",
        }
    from transformer_lens.tools.analysis import JacobianLens

    layer = where[0]
    ids = encode_text(model, text, max_tokens)
    text_cut = model.tokenizer.decode(ids[n_prefix(model) :])
    lens = JacobianLens.fit(
        model,
        [text_cut],
        corpus="analoglock-crosscheck",
        source_layers=[layer],
        dim_batch=8,
        max_seq_len=len(ids),
        skip_first_positions=skip_first,
        show_progress=False,
    )
    theirs = lens.jacobians[layer] @ direction.float()
    lens_ids = model.to_tokens(text_cut)[0, : len(ids)].cpu()
    sources = list(range(skip_first, len(lens_ids) - 1))
    mask = torch.zeros(len(sources), len(lens_ids))
    mask[torch.arange(len(sources)), torch.tensor(sources)] = 1
    f = perturbed_fn(
        model,
        lens_ids,
        hook,
        mask,
        capture=f"blocks.{n_layers - 1}.hook_out",
        capture_positions=sources,
    )
    _, jv, how = directional_derivative(
        f, direction.float()[None].expand(len(sources), -1).contiguous()
    )
    ours = jv.mean(0).cpu()
    return {
        "applicable": True,
        "layer": layer,
        "n_source_positions": len(sources),
        "tokens_match": bool(torch.equal(lens_ids, ids)),
        "ours_norm": float(ours.norm()),
        "jlens_norm": float(theirs.norm()),
        "max_abs_diff": float((ours - theirs).abs().max()),
        "relative_error": float((ours - theirs).norm() / theirs.norm().clamp_min(1e-30)),
        "method": how,
    }


# ---------------------------------------------------------------- runner


def run(cfg: Any, ctx) -> dict[str, Any]:
    """`analoglock-relations analyses=[jacobian]`: analyze_jacobian from its section
    (`JacobianConfig`) at its hook (default ctx.hooks[0]); ctx.basis is used if fit there."""
    c = settings(cfg, JacobianConfig)
    hook = c.hook or ctx.hooks[0]
    kwargs = {
        k: getattr(c, k)
        for k in ("texts", "n_directions", "n_random", "steps", "metric", "positions", "method")
        + ("tol", "max_tokens", "batch_size", "crosscheck", "crosscheck_tokens")
        if getattr(c, k) is not None
    }
    if c.target_tokens is not None:
        kwargs["target_tokens"] = tuple(c.target_tokens)
    return analyze_jacobian(
        ctx.model, hook, basis=basis_at(ctx.basis, hook, strict=True), seed=ctx.seed, **kwargs
    )
