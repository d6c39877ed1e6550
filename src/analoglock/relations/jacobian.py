"""Rate of change of the model's output along a layer's singular directions.

Owns the derivative of an output (next-token log-probabilities at the last position, or one logit
difference) with respect to moving the activation at one hook along a direction: exact
Jacobian-vector products (forward mode, `torch.func.jvp`, through the TransformerBridge and its
hooks; double-backward and central finite differences as fallbacks/cross-checks), the finite-step
response over a grid of step sizes and its classification (linear, saturating, accelerating,
flip, nonmonotone), random unit directions as the control, and a cross-check of one number
against TransformerLens's `JacobianLens` fit. Knows nothing of concepts or of the CLI beyond
`run(cfg, ctx)`.

Units. Directions are unit vectors in activation space; a step t moves the activation by t along
them; the step grid is given as fractions of the mean norm of the perturbed activations. For
log-probabilities the size of a derivative J v is its Fisher norm sqrt(sum_i p_i (J v)_i^2)
(so KL(p_0 || p_t) ~ t^2 |J v|_F^2 / 2); the L2 norm over the vocabulary is reported beside it.
The step response is the Fisher-weighted least-squares coefficient of the finite change
Delta(t) on J v, divided by t: 1 where the output moves as the derivative predicts.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import plotly.graph_objects as go
import torch
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.activations import harvest
from analoglock.data import Document, load_pairs
from analoglock.hooks import validate_hook
from analoglock.positions import AllTokens
from analoglock.tokens import prepend_bos_id

log = logging.getLogger(__name__)

METHODS = ("auto", "jvp", "double_backward", "finite_difference")
METRICS = ("logprobs", "logit_diff")
POSITIONS = ("last", "all")
CLASSES = ("linear", "saturating", "accelerating", "flip", "nonmonotone")
DEFAULT_STEPS = (0.05, 0.2, 0.5, 1.0)  # fractions of the mean norm of the perturbed activations


# ---------------------------------------------------------------- the perturbed function


def position_mask(
    n_pos: int, positions: str | Sequence[int], skip: int
) -> Annotated[Tensor, "pos"]:
    """1.0 at the perturbed positions: "last", "all" (non-BOS), or explicit indices."""
    mask = torch.zeros(n_pos)
    if positions == "last":
        mask[-1] = 1
    elif positions == "all":
        mask[skip:] = 1
    elif isinstance(positions, str):
        raise ValueError(
            f"positions must be one of {POSITIONS} or a list of indices, not {positions!r}"
        )
    else:
        idx = [p + n_pos if p < 0 else p for p in positions]
        if not idx or any(not 0 <= p < n_pos for p in idx):
            raise ValueError(f"positions {list(positions)} out of range for {n_pos} tokens")
        mask[idx] = 1
    return mask


def output_head(
    metric: str, token_ids: tuple[int, int] | None = None
) -> Callable[[Tensor], Tensor]:
    """Maps last-position logits [k, vocab] to the output being differentiated [k, m]."""
    if metric == "logprobs":
        return lambda logits: torch.log_softmax(logits.float(), dim=-1)
    if metric == "logit_diff":
        if token_ids is None:
            raise ValueError("metric='logit_diff' needs target tokens (token_a, token_b)")
        a, b = token_ids
        return lambda logits: (logits[:, a] - logits[:, b]).float()[:, None]
    raise ValueError(f"Unknown metric {metric!r}; valid: {', '.join(METRICS)}")


@torch.no_grad()
def prefix_cache(model, ids: Annotated[Tensor, "pos"]):
    """The HF KV cache of `ids` (run once, then reused by every perturbed copy of the next token)."""
    out = model.original_model(ids[None].to(model.cfg.device), use_cache=True)
    return out.past_key_values


def perturbed_fn(
    model,
    ids: Annotated[Tensor, "pos"],
    hook: str,
    mask: Annotated[Tensor, "k pos"],
    head: Callable[[Tensor], Tensor] | None = None,
    capture: str | None = None,
    capture_positions: Sequence[int] | None = None,
) -> Callable[[Tensor], Tensor]:
    """f(delta [k, d_model]) -> [k, m]: run k copies of `ids` with mask[i, p] * delta[i] added to the
    activation at `hook`, and return head(last-position logits), or, with `capture`, the sum over
    `capture_positions` (default all) of the activation at that hook.

    When only the last position is perturbed, the unperturbed prefix is run once and its KV cache
    reused, so each call runs one token per copy (exact up to float rounding; tested).
    """
    k = mask.shape[0]
    dev = model.cfg.device
    d_model = model.cfg.d_model
    last_only = capture is None and len(ids) > 1 and not bool(mask[:, :-1].any())
    if last_only:
        cached = prefix_cache(model, ids[:-1])
        batch, m = ids[-1:][None].expand(k, -1).to(dev), mask[:, -1:].to(dev)[:, :, None]
    else:
        batch, m = ids[None].expand(k, -1).to(dev), mask.to(dev)[:, :, None]

    def f(delta: Tensor) -> Tensor:
        seen: dict[str, Tensor] = {}

        def add(x: Tensor, hook=None) -> Tensor:
            if x.shape[-1] != d_model or x.ndim != 3:
                raise ValueError(
                    f"Hook {hook.name if hook else '?'} carries activations of shape {tuple(x.shape)}; "
                    f"directions need [batch, pos, d_model={d_model}] (e.g. a hook_resid_post)."
                )
            return x + m.to(x.dtype) * delta[:, None, :].to(x.dtype)

        def grab(x: Tensor, hook=None) -> None:
            seen["x"] = x

        kwargs: dict[str, Any] = {}
        if last_only:
            cache = copy.deepcopy(cached)  # each forward appends to its cache
            cache.batch_repeat_interleave(k)
            kwargs = {"cache": cache, "use_cache": True}
        fwd = [(hook, add)] + ([(capture, grab)] if capture else [])
        with model.hooks(fwd_hooks=fwd):
            # logits_to_keep=1: only the last position is unembedded (HF's own switch)
            logits = model(
                batch, return_type="logits" if capture is None else None, logits_to_keep=1, **kwargs
            )
        if capture is not None:
            x = seen["x"].float()
            return (x if capture_positions is None else x[:, list(capture_positions)]).sum(1)
        return head(logits[:, -1])

    return f


def directional_derivative(
    f: Callable[[Tensor], Tensor],
    v: Annotated[Tensor, "k d"],
    method: str = "auto",
    eps: float = 1e-2,
) -> tuple[Tensor, Tensor, str]:
    """(f(0), J v, method used) for f: [k, d] -> [k, m] at delta = 0.

    "jvp": forward mode (torch.func.jvp); "double_backward": J v as the gradient of a VJP;
    "finite_difference": (f(eps v) - f(-eps v)) / 2 eps; "auto": jvp, falling back to
    double_backward (logged and reported) if forward mode fails through the model.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; valid: {', '.join(METHODS)}")
    zero = torch.zeros_like(v)
    if method in ("auto", "jvp"):
        try:
            out, jv = torch.func.jvp(f, (zero,), (v,))
            return out.detach(), jv.detach(), "jvp"
        except (RuntimeError, NotImplementedError, TypeError) as err:
            if method == "jvp":
                raise
            log.warning(
                "forward-mode JVP failed through the model (%s); using double backward", err
            )
            method = "double_backward"
    if method == "double_backward":
        with torch.enable_grad():
            x = zero.clone().requires_grad_(True)
            y = f(x)
            u = torch.zeros_like(y, requires_grad=True)
            (g,) = torch.autograd.grad(y, x, grad_outputs=u, create_graph=True)
            (jv,) = torch.autograd.grad(g, u, grad_outputs=v)
        return y.detach(), jv.detach(), "double_backward"
    with torch.no_grad():
        out = f(zero)
        jv = (f(eps * v) - f(-eps * v)) / (2 * eps)
    return out, jv, "finite_difference"


# ---------------------------------------------------------------- response and classes


def fisher_norm(jv: Annotated[Tensor, "k m"], p: Annotated[Tensor, "k m"] | None) -> Tensor:
    """sqrt(sum_i p_i (Jv)_i^2) for log-probabilities; |Jv| for a scalar output (p=None)."""
    return jv.abs()[:, 0] if p is None else (p * jv.pow(2)).sum(-1).sqrt()


def response_ratio(delta: Tensor, jv: Tensor, t: float, p: Tensor | None) -> Tensor:
    """Fisher-weighted coefficient of the finite change on J v, over t (1 = as the derivative says)."""
    w = torch.ones_like(jv) if p is None else p
    num = (w * delta * jv).sum(-1)
    den = (w * jv * jv).sum(-1).clamp_min(1e-30)
    return num / den / t


def classify_response(ratios: Sequence[float], tol: float = 0.25) -> str:
    """Class of one side's response ratios over increasing |t| (see CLASSES)."""
    r = [float(x) for x in ratios]
    if not r:
        raise ValueError("classify_response needs at least one ratio")
    if any(x < 0 for x in r):
        return "flip"  # the output moved against its derivative
    if all(abs(x - 1) <= tol for x in r):
        return "linear"
    diffs = [b - a for a, b in zip(r, r[1:], strict=False)]
    if r[-1] < 1 - tol and all(d <= tol for d in diffs):
        return "saturating"
    if r[-1] > 1 + tol and all(d >= -tol for d in diffs):
        return "accelerating"
    return "nonmonotone"


def random_directions(n: int, d: int, gen: torch.Generator) -> Annotated[Tensor, "n d"]:
    """Gaussian directions of unit norm (the singular directions' norm)."""
    x = torch.randn(n, d, generator=gen)
    return x / x.norm(dim=-1, keepdim=True)


def _chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size`."""
    return [slice(i, min(i + size, n)) for i in range(0, n, max(1, int(size)))]


@torch.no_grad()
def _acts_norm(model, ids: Tensor, hook: str, mask: Tensor) -> float:
    """Mean norm of the activations at the perturbed positions (the step unit)."""
    _, cache = model.run_with_cache(ids[None].to(model.cfg.device), names_filter=[hook])
    x = cache[hook][0].float().cpu()
    return float(x[mask.bool()].norm(dim=-1).mean())


def text_response(
    model,
    ids: Tensor,
    hook: str,
    dirs: Annotated[Tensor, "k d"],
    steps: Sequence[float],
    head: Callable[[Tensor], Tensor],
    metric: str,
    positions: str | Sequence[int],
    method: str,
    batch_size: int,
) -> dict[str, Any]:
    """Derivatives and step responses of one text along every direction."""
    skip = 1 if prepend_bos_id(model) is not None else 0
    mask1 = position_mask(len(ids), positions, skip)
    unit = _acts_norm(model, ids, hook, mask1)
    d_size, ratios, kls, used = [], [], [], set()
    l2 = []
    for sl in _chunks(len(dirs), batch_size):
        v = dirs[sl].to(model.cfg.device)
        f = perturbed_fn(model, ids, hook, mask1[None].expand(len(v), -1), head)
        out, jv, how = directional_derivative(f, v, method, eps=1e-3 * unit)
        used.add(how)
        p = out.exp() if metric == "logprobs" else None
        d_size.append(fisher_norm(jv, p).cpu())
        l2.append(jv.norm(dim=-1).cpu())
        r_side, kl_side = [], []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                rs, ks = [], []
                for a in steps:
                    t = sign * a * unit
                    delta = f(t * v) - out
                    rs.append(response_ratio(delta, jv, t, p).cpu())
                    if p is not None:
                        ks.append(-(p * delta).sum(-1).cpu())  # KL(p0 || pt)
                r_side.append(torch.stack(rs, -1))
                kl_side.append(torch.stack(ks, -1) if ks else torch.zeros(len(v), 0))
        ratios.append(torch.stack(r_side, 1))  # [k, 2, n_steps]
        kls.append(torch.stack(kl_side, 1))
    return {
        "unit": unit,
        "fisher": torch.cat(d_size),
        "l2": torch.cat(l2),
        "ratios": torch.cat(ratios),
        "kl": torch.cat(kls),
        "methods": sorted(used),
    }


# ---------------------------------------------------------------- the analysis


def default_texts(n: int = 4) -> list[str]:
    """Both sides of the first vacation/deadline pairs."""
    pairs = load_pairs("vacation_deadline")
    return [s for p in pairs[: (n + 1) // 2] for s in (p.a, p.b)][:n]


def _encode(model, text: str, max_tokens: int | None) -> Tensor:
    """BOS + token ids, truncated to max_tokens."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = prepend_bos_id(model)
    ids = ([bos] if bos is not None else []) + list(ids)
    if len(ids) < 2:
        raise ValueError(f"Text {text!r} is too short to differentiate (needs >= 1 token)")
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def fit_svd_basis(model, texts: Sequence[str], hook: str, n_components: int):
    """analoglock.bases.SVDBasis fit on every non-BOS token of `texts` at `hook`."""
    from analoglock.bases import SVDBasis

    docs = [Document(f"jac/{i}", t) for i, t in enumerate(texts)]
    x = harvest(model, docs, [hook], AllTokens(), progress=False).acts[hook].float()
    return SVDBasis(n_components=min(int(n_components), *x.shape), hook=hook).fit(x)


def analyze_jacobian(
    model,
    hook: str,
    texts: Sequence[str] | None = None,
    *,
    basis=None,
    fit_texts: Sequence[str] | None = None,
    n_directions: int = 16,
    n_random: int = 16,
    steps: Sequence[float] = DEFAULT_STEPS,
    metric: str = "logprobs",
    target_tokens: tuple[str, str] | None = None,
    positions: str | Sequence[int] = "last",
    method: str = "auto",
    tol: float = 0.25,
    max_tokens: int | None = 48,
    batch_size: int = 16,
    crosscheck: bool = False,
    crosscheck_tokens: int = 12,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Derivative of the output along each of a basis's directions at `hook`, ranked, with its
    step response classified, beside random unit directions.

    `basis` defaults to an SVDBasis of `n_directions` fit at `hook` on `fit_texts` (default: the
    texts themselves plus the next vacation/deadline stories). Directions are normalised to unit
    norm (their original norms are reported). `target_tokens` (two strings, one token each) turn
    the output into a logit difference.
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
        token_ids = tuple(_single_token(model, s) for s in (target_tokens or ()))
        if len(token_ids) != 2:
            raise ValueError("metric='logit_diff' needs target_tokens=(token_a, token_b)")
    head = output_head(metric, token_ids)
    if basis is None:
        basis = fit_svd_basis(
            model, list(fit_texts or texts + default_texts(12)[len(texts) :]), hook, n_directions
        )
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
    rand = random_directions(int(n_random), model.cfg.d_model, gen)
    all_dirs = torch.cat([dirs, rand])
    per_text = []
    for text in tqdm(texts, desc="jacobian texts", disable=not progress):
        ids = _encode(model, text, max_tokens)
        per_text.append(
            text_response(
                model, ids, hook, all_dirs, steps, head, metric, positions, method, batch_size
            )
        )
    n = len(dirs)
    fisher = torch.stack([r["fisher"] for r in per_text]).mean(0)  # [k]
    l2 = torch.stack([r["l2"] for r in per_text]).mean(0)
    ratios = torch.stack([r["ratios"] for r in per_text]).median(0).values  # [k, 2, n_steps]
    kl = torch.stack([r["kl"] for r in per_text]).mean(0)
    rand_f = fisher[n:]
    classes = [
        [classify_response(ratios[i, s].tolist(), tol) for s in range(2)]
        for i in range(len(all_dirs))
    ]
    order = torch.argsort(fisher[:n], descending=True).tolist()
    size_name = "fisher_norm" if metric == "logprobs" else "abs_derivative"
    directions = [
        {
            "index": i,
            "rank": r + 1,
            size_name: float(fisher[i]),
            "l2_norm": float(l2[i]),
            "ratio_to_random_mean": float(fisher[i] / rand_f.mean().clamp_min(1e-30)),
            "random_percentile": float((rand_f < fisher[i]).float().mean()),
            "direction_norm": float(norms[i]),
            "singular_value": _singular_value(basis, i),
            "response_ratio": {"+": ratios[i, 0].tolist(), "-": ratios[i, 1].tolist()},
            "kl": {"+": kl[i, 0].tolist(), "-": kl[i, 1].tolist()}
            if metric == "logprobs"
            else None,
            "class": {"+": classes[i][0], "-": classes[i][1]},
        }
        for r, i in enumerate(order)
    ]
    random_rows = [
        {
            size_name: float(fisher[n + j]),
            "response_ratio": {"+": ratios[n + j, 0].tolist(), "-": ratios[n + j, 1].tolist()},
            "class": {"+": classes[n + j][0], "-": classes[n + j][1]},
        }
        for j in range(len(rand))
    ]
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
        "random": {
            "n": len(rand),
            f"mean_{size_name}": float(rand_f.mean()),
            f"max_{size_name}": float(rand_f.max()),
            "directions": random_rows,
        },
        "class_counts": {
            "singular": _class_counts(classes[:n]),
            "random": _class_counts(classes[n:]),
        },
        "smallest_step_ratio": {
            "singular_median": float(ratios[:n, :, 0].median()),
            "random_median": float(ratios[n:, :, 0].median()),
        },
    }
    if crosscheck:
        # JacobianLens.fit costs d_model backward passes, so the cross-check uses a short prefix
        result["jlens_crosscheck"] = jlens_crosscheck(
            model, hook, texts[0], dirs[order[0]], crosscheck_tokens
        )
    return result


def _single_token(model, s: str) -> int:
    """The id of a string that is exactly one token."""
    ids = model.tokenizer(s, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"Target token {s!r} is {len(ids)} tokens; give strings that are one token each"
        )
    return int(ids[0])


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

_RESID_POST_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|out)$")


def jlens_crosscheck(
    model, hook: str, text: str, direction: Tensor, max_tokens: int | None = 48, skip_first: int = 1
) -> dict[str, Any]:
    """J_l v from TransformerLens's JacobianLens.fit on one text vs the same quantity from our JVPs.

    J_l averages, over source positions s in V = skip_first .. n-2, the sum over targets t in V,
    t >= s, of d h_final[t] / d h_l[s]; we perturb position s alone, take the JVP of the final
    block output summed over V, and average over s. Applies to block outputs below the last layer.
    """
    m = _RESID_POST_RE.match(hook)
    n_layers = model.cfg.n_layers
    if m is None or int(m.group(1)) >= n_layers - 1:
        return {
            "applicable": False,
            "reason": "JacobianLens transports block outputs (blocks.<l>.hook_out = hook_resid_post) "
            f"for l < {n_layers - 1} to the final block output; {hook!r} is not one.",
        }
    from transformer_lens.tools.analysis import JacobianLens

    layer = int(m.group(1))
    ids = _encode(model, text, max_tokens)
    text_cut = model.tokenizer.decode(ids[1:] if prepend_bos_id(model) is not None else ids)
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


# ---------------------------------------------------------------- report


def figures(result: Mapping[str, Any]) -> dict[str, go.Figure]:
    """Derivative sizes vs random, and step-response curves of the top directions."""
    size = result["size"]
    dirs = result["directions"]
    rand = [r[size] for r in result["random"]["directions"]]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=[f"d{d['index']}" for d in dirs],
            y=[d[size] for d in dirs],
            name="singular directions",
        )
    )
    fig.add_trace(go.Box(y=rand, name="random unit directions", boxpoints="all"))
    fig.update_layout(
        title=f"{result['hook']}: {size} of d output / d step, ranked", yaxis_title=size
    )
    figs = {"jacobian/ranked": fig}
    fig = go.Figure()
    for d in dirs[:6]:
        for side in ("+", "-"):
            fig.add_trace(
                go.Scatter(
                    x=result["steps"],
                    y=d["response_ratio"][side],
                    mode="lines+markers",
                    name=f"d{d['index']} {side} ({d['class'][side]})",
                )
            )
    for j, r in enumerate(result["random"]["directions"][:3]):
        fig.add_trace(
            go.Scatter(
                x=result["steps"],
                y=r["response_ratio"]["+"],
                mode="lines",
                line_dash="dot",
                name=f"random {j} +",
            )
        )
    fig.add_hline(y=1.0, line_dash="dash", annotation_text="linear")
    fig.update_layout(
        title="Step response / derivative prediction (1 = linear)",
        xaxis_title=f"step ({result['step_unit']})",
        xaxis_type="log",
        yaxis_title="response ratio",
    )
    figs["jacobian/response"] = fig
    return figs


# ---------------------------------------------------------------- CLI adapter


def run(cfg: Any, ctx) -> dict[str, Any]:
    """`analoglock-relations analyses=[jacobian]`: analyze_jacobian at cfg.hook (default ctx.hooks[0]).

    Keys (all optional): hook, texts, n_directions, n_random, steps, metric, target_tokens,
    positions, method, tol, max_tokens, batch_size, crosscheck. ctx.basis is used if fit at hook.
    """
    from analoglock.relations.interpolate import _section

    c = _section(cfg)
    hook = c.get("hook") or ctx.hooks[0]
    basis = (
        ctx.basis if ctx.basis is not None and getattr(ctx.basis, "hook", None) == hook else None
    )
    keys = (
        "texts",
        "n_directions",
        "n_random",
        "steps",
        "metric",
        "target_tokens",
        "positions",
        "method",
        "tol",
        "max_tokens",
        "batch_size",
        "crosscheck",
        "crosscheck_tokens",
    )
    kwargs = {k: c[k] for k in keys if c.get(k) is not None}
    if "target_tokens" in kwargs:
        kwargs["target_tokens"] = tuple(kwargs["target_tokens"])
    return analyze_jacobian(ctx.model, hook, basis=basis, seed=ctx.seed, **kwargs)
