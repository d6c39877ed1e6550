"""Interpolation paths: the math, the model run along a path, and what is read along it.

Owns linear and spherical interpolation (per position, exact at the ends); running the model with
the activation at one hook replaced by (or shifted along) a path and reading a later residual
hook; the feature reader (a basis's codes, split into signed halves, pooled over the text
positions and z-scored against a reference); and the commonality / tangent definitions:
- z_f(x) = (a_f(x) - mu_f) / sigma_f, with mu/sigma over the reference texts;
- commonality: z_f >= theta at both ends of a path;
- tangent: max over interior steps of z_f >= theta, both ends < theta, and the interior peak
  exceeds the larger end by at least `margin`.
Knows nothing of which inputs or controls an analysis chooses (see interpolate.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
from torch import Tensor

from analoglock.hooks import residual_depth as _depth
from analoglock.hooks import stop_layer, validate_hook
from analoglock.relations.text import n_prefix, top_tokens

MODES = ("linear", "slerp")


class IncompatibleHookError(ValueError):
    """A hook where interpolating or reading a path is not meaningful."""


# ---------------------------------------------------------------- interpolation math


def step_grid(n_steps: int) -> Annotated[Tensor, "n_steps"]:
    """t = 0, 1/(n-1), ..., 1 (float64 so the endpoints are exact)."""
    if int(n_steps) < 2:
        raise ValueError(f"n_steps must be >= 2 (the two endpoints), got {n_steps}")
    return torch.linspace(0.0, 1.0, int(n_steps), dtype=torch.float64)


def lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """(1 - t) a + t b for every t: [n_steps, *a.shape]; exact at t = 0 and 1."""
    t = t.to(a.dtype).reshape(-1, *([1] * a.ndim))
    return (1 - t) * a + t * b


def slerp(a: Tensor, b: Tensor, t: Tensor, eps: float = 1e-7) -> Tensor:
    """Spherical interpolation along the last dim: the direction moves on the great circle from
    a to b, the norm moves linearly from |a| to |b|; [n_steps, *a.shape], exact at t = 0 and 1.

    Where a and b are (anti)parallel the great circle is undefined and the direction is lerped.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
    ua, ub = a64 / na.clamp_min(eps), b64 / nb.clamp_min(eps)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    tt = t.double().reshape(-1, *([1] * a.ndim))
    ok = sin.abs() > eps
    safe = torch.where(ok, sin, torch.ones_like(sin))
    u_sph = (torch.sin((1 - tt) * theta) * ua + torch.sin(tt * theta) * ub) / safe
    u_lin = (1 - tt) * ua + tt * ub
    u_lin = u_lin / u_lin.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = torch.where(ok, u_sph, u_lin)
    out = (((1 - tt) * na + tt * nb) * u).to(a.dtype)
    out[t == 0] = a  # bit-exact endpoints, so a path's ends reproduce the plain runs
    out[t == 1] = b
    return out


def interpolate(a: Tensor, b: Tensor, t: Tensor, mode: str) -> Tensor:
    """lerp or slerp by name."""
    if mode not in MODES:
        raise ValueError(f"Unknown interpolation mode {mode!r}; valid: {', '.join(MODES)}")
    return lerp(a, b, t) if mode == "linear" else slerp(a, b, t)


# ---------------------------------------------------------------- hooks


def residual_depth(model, hook: str) -> int:
    """`analoglock.hooks.residual_depth` of a hook the model has; raises for hooks that are not a
    complete residual state (replacing them would not carry an input's whole state forward)."""
    validate_hook(model, hook)
    depth = _depth(hook)
    if depth is None:
        raise IncompatibleHookError(
            f"Hook {hook!r} is not a complete residual-stream state: replacing it would not carry "
            "input B's whole state forward (so t=1 would not reproduce B), and the logit lens does "
            "not apply to it. Use hook_embed, blocks.<l>.hook_resid_pre or blocks.<l>.hook_resid_post."
        )
    return depth


def check_read_after(model, hooks: Sequence[str], read_hook: str) -> None:
    """The read hook must lie strictly downstream of every interpolation hook."""
    read_depth = residual_depth(model, read_hook)
    for hook in hooks:
        if residual_depth(model, hook) >= read_depth:
            raise IncompatibleHookError(
                f"read_hook {read_hook!r} is not after the interpolation hook {hook!r}: features "
                "read there would be the interpolation itself, not the model's response to it. "
                f"Choose a later residual hook (e.g. blocks.{model.cfg.n_layers - 1}.hook_resid_post)."
            )


def default_hooks(model) -> tuple[list[str], str]:
    """Interpolation hooks (embedding, 1/4 and 1/2 depth) and the read hook (3/4 depth)."""
    n = model.cfg.n_layers
    hooks = ["hook_embed", f"blocks.{n // 4}.hook_resid_post", f"blocks.{n // 2}.hook_resid_post"]
    return hooks, f"blocks.{max((3 * n) // 4, n // 2 + 1)}.hook_resid_post"


# ---------------------------------------------------------------- running the model


@torch.no_grad()
def cache_at(model, ids: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
    """Activations [pos, d] of one input at each hook (the run stops after the deepest one)."""
    stop = stop_layer(hooks, model.cfg.n_layers)
    _, cache = model.run_with_cache(
        ids[None].to(model.cfg.device), names_filter=lambda n: n in hooks, stop_at_layer=stop
    )
    return {h: cache[h][0].detach().float().cpu() for h in hooks}


@torch.no_grad()
def run_with_edit(model, ids: Tensor, hook: str, edit, read_hook: str, n: int) -> Tensor:
    """Run `n` copies of `ids`, editing the activation at `hook` with `edit(x) -> x'` ([n, pos, d]);
    returns the read-hook activations [n, pos, d] (the run stops after the read hook)."""
    captured: dict[str, Tensor] = {}

    def edit_hook(x: Tensor, hook=None) -> Tensor:
        new = edit(x)
        if new.shape != x.shape:
            raise IncompatibleHookError(
                f"Hook {hook.name if hook else '?'} carries activations of shape {tuple(x.shape)}, "
                f"but the edit produced {tuple(new.shape)}; interpolate activations of that shape."
            )
        return new.to(x.dtype)

    def read(x: Tensor, hook=None) -> None:
        captured["read"] = x.detach().float().cpu()

    batch = ids[None].expand(n, -1).to(model.cfg.device)
    stop = stop_layer([read_hook], model.cfg.n_layers)
    with model.hooks(fwd_hooks=[(hook, edit_hook), (read_hook, read)]):
        model(batch, stop_at_layer=stop, return_type=None)
    return captured["read"]


def lens_top_tokens(model, resid: Annotated[Tensor, "n d_model"], k: int) -> list[list[str]]:
    """Logit-lens top-k tokens (final norm + unembed) of residual vectors."""
    with torch.no_grad():
        dev = model.cfg.device
        logits = model.unembed(model.ln_final(resid[:, None].to(dev)))[:, 0]
    return top_tokens(model, logits, k)


# ---------------------------------------------------------------- features


class FeatureReader:
    """Pooled, z-scored feature activity at one hook in one basis.

    Signed bases (SVD, PCA) are split into positive and negative halves ("f3+", "f3-"), so a
    feature active at both ends of a path is active with the same sign. Activity is the mean
    over non-prefix positions of each half's rectified code; z-scores are against `reference`.
    """

    def __init__(self, basis, hook: str, skip: int, signed: bool):
        self.basis, self.hook, self.skip, self.signed = basis, hook, skip, signed
        k = basis.n_features
        self.names = (
            [f"f{i}{s}" for i in range(k) for s in "+-"] if signed else [f"f{i}" for i in range(k)]
        )
        self.mu: Tensor | None = None
        self.sigma: Tensor | None = None

    def halves(self, codes: Tensor) -> Tensor:
        """Rectified codes, split into (+, -) halves when the basis is signed."""
        if self.signed:
            return torch.stack([codes.clamp_min(0), (-codes).clamp_min(0)], dim=-1).flatten(-2)
        return codes.clamp_min(0)

    def activity(self, acts: Annotated[Tensor, "n pos d_model"]) -> Annotated[Tensor, "n f"]:
        """Mean rectified code per half-feature over the non-prefix positions."""
        with torch.no_grad():
            codes = self.basis.encode(acts[:, self.skip :].float())  # [n, pos, k]
        return self.halves(codes).mean(1)

    def calibrate(self, activity: Annotated[Tensor, "n_ref f"]) -> FeatureReader:
        """Set mu/sigma from reference activity (sigma floored so silent features stay finite)."""
        if len(activity) < 2:
            raise ValueError("The reference needs at least 2 texts to z-score features")
        self.mu = activity.mean(0)
        sd = activity.std(0)
        self.sigma = sd + 0.05 * sd.median().clamp_min(1e-8)  # a never-active half gets a floor
        return self

    def z(self, activity: Annotated[Tensor, "n f"]) -> Annotated[Tensor, "n f"]:
        """z-scores against the reference."""
        if self.mu is None:
            raise RuntimeError(
                "FeatureReader is not calibrated; call calibrate(reference activity)"
            )
        return (activity - self.mu) / self.sigma


def doc_activity(model, reader: FeatureReader, texts: Sequence[str]) -> Annotated[Tensor, "n f"]:
    """Pooled activity of whole texts (harvested at the reader's hook, every non-BOS token)."""
    from analoglock.activations import harvest
    from analoglock.data import Document
    from analoglock.positions import AllTokens

    docs = [Document(f"interp/{i}", t) for i, t in enumerate(texts)]
    acts = harvest(model, docs, [reader.hook], AllTokens(), progress=False)
    with torch.no_grad():
        codes = reader.halves(reader.basis.encode(acts.acts[reader.hook].float()))
    n = len(texts)
    total = torch.zeros(n, codes.shape[-1]).index_add_(0, acts.doc, codes)
    count = torch.bincount(acts.doc, minlength=n).clamp_min(1)[:, None]
    return total / count


def commonalities(z0: Tensor, z1: Tensor, theta: float) -> list[int]:
    """Features with z >= theta at both ends."""
    return torch.nonzero((z0 >= theta) & (z1 >= theta)).flatten().tolist()


def tangents(z: Annotated[Tensor, "n_steps f"], theta: float, margin: float) -> list[int]:
    """Features peaking in the interior (>= theta, >= margin above both ends) but weak at both ends."""
    if len(z) < 3:
        return []
    ends = torch.maximum(z[0], z[-1])
    peak = z[1:-1].max(0).values
    hit = (peak >= theta) & (z[0] < theta) & (z[-1] < theta) & (peak - ends >= margin)
    return torch.nonzero(hit).flatten().tolist()


# ---------------------------------------------------------------- paths


def path_record(
    model, reader: FeatureReader, read: Tensor, theta: float, margin: float, top_k: int
) -> dict[str, Any]:
    """Commonalities, tangents, z matrix and top tokens of one path's read activations."""
    z = reader.z(reader.activity(read))
    com, tan = commonalities(z[0], z[-1], theta), tangents(z, theta, margin)
    return {
        "commonalities": [reader.names[i] for i in com],
        "tangents": [reader.names[i] for i in tan],
        "n_commonalities": len(com),
        "n_tangents": len(tan),
        "z": z.tolist(),
        "lens_top_tokens": lens_top_tokens(model, read[:, -1], top_k),
    }


def input_path(
    model,
    reader: FeatureReader,
    ids_a: Tensor,
    ids_b: Tensor,
    hook: str,
    mode: str,
    t: Tensor,
    theta: float,
    margin: float,
    top_k: int = 5,
) -> dict[str, Any]:
    """Interpolate between two equal-length inputs' activations at `hook` and read the path."""
    if ids_a.shape != ids_b.shape:
        raise ValueError(
            f"Inputs must have equal token counts, got {len(ids_a)} and {len(ids_b)}; "
            "use equal_length() first"
        )
    xa, xb = (
        cache_at(model, ids_a, [hook, reader.hook]),
        cache_at(model, ids_b, [hook, reader.hook]),
    )
    path = interpolate(xa[hook], xb[hook], t, mode)
    read = run_with_edit(model, ids_a, hook, lambda x: path.to(x.device), reader.hook, len(t))
    rec = path_record(model, reader, read, theta, margin, top_k)
    # t=0 / t=1 reproduce the plain runs of A / B at the read hook: the edit is exact, so what
    # differs is float32 summation order (batched vs single run), a few ulps of the largest
    # activation; the relative difference says so whatever the activation scale.
    diffs = [(read[0] - xa[reader.hook]).abs().max(), (read[-1] - xb[reader.hook]).abs().max()]
    scales = [xa[reader.hook].abs().max(), xb[reader.hook].abs().max()]
    rec["endpoint_max_abs_diff"] = [float(d) for d in diffs]
    rec["endpoint_relative_diff"] = [
        float(d / s.clamp_min(1e-30)) for d, s in zip(diffs, scales, strict=True)
    ]
    return rec


def relation_path(
    model,
    reader: FeatureReader,
    ids: Tensor,
    hook: str,
    r_a: Tensor,
    r_b: Tensor,
    mode: str,
    t: Tensor,
    theta: float,
    margin: float,
    top_k: int = 5,
) -> dict[str, Any]:
    """Add the interpolation between two relation vectors at every text position of `ids`."""
    d = model.cfg.d_model
    if r_a.shape != (d,) or r_b.shape != (d,):
        raise ValueError(
            f"Relation vectors must be [d_model={d}], got {tuple(r_a.shape)} and {tuple(r_b.shape)}"
        )
    vs = interpolate(r_a.float(), r_b.float(), t, mode)  # [n_steps, d]
    skip = n_prefix(model)

    def add(x: Tensor) -> Tensor:
        out = x.clone()
        out[:, skip:] += vs[:, None].to(x.device, x.dtype)
        return out

    read = run_with_edit(model, ids, hook, add, reader.hook, len(t))
    return path_record(model, reader, read, theta, margin, top_k)
