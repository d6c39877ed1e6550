"""Directional derivatives of a model's output with respect to one hook's activations.

Owns the perturbed function (k copies of a text with a vector added at one hook, at chosen
positions; the unperturbed prefix run once and its KV cache reused when only the last position
moves), its derivative along a direction (exact forward mode, `torch.func.jvp`, through the
TransformerBridge and its hooks; double backward and central finite differences as fallbacks and
cross-checks), the finite-step response over a grid of steps, and its classification (linear,
saturating, accelerating, flip, nonmonotone). Knows nothing of which directions are asked about
(see jacobian.py).

Units. Directions are unit vectors in activation space; a step t moves the activation by t along
them. For log-probabilities the size of a derivative J v is its Fisher norm
sqrt(sum_i p_i (J v)_i^2) (so KL(p_0 || p_t) ~ t^2 |J v|_F^2 / 2). The step response is the
Fisher-weighted least-squares coefficient of the finite change Delta(t) on J v, divided by t: 1
where the output moves as the derivative predicts.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import torch
from torch import Tensor

from analoglock.relations.text import n_prefix

log = logging.getLogger(__name__)

METHODS = ("auto", "jvp", "double_backward", "finite_difference")
METRICS = ("logprobs", "logit_diff")
POSITIONS = ("last", "all")
CLASSES = ("linear", "saturating", "accelerating", "flip", "nonmonotone")


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
    skip = n_prefix(model)
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
