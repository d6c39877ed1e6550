"""Steering hooks: add a vector, or move toward the learned map, at chosen token positions.

Owns what one intervention is (`Steering`: a vector `x + scale v` or a map `x + alpha (M(x) - x)`
at one hook and one positions rule), the checks that refuse a bad one before any hook runs, the
boolean position masks that say which tokens of a padded batch it touches, the hook functions
themselves, and the random directions that control for it. Knows nothing of prompts, datasets or
measures: callers give token positions; `prompts` finds them in text.

Positions (what a rule touches in a pass over a prompt, or a prompt and its continuation):
  "roles"  the prompt's tokens inside aligned role mentions;
  "prompt" every prompt token;
  "new"    the last prompt token (it predicts the first new token) and every token after it;
  "all"    every token.
The first token is never touched when it is the BOS the model prepends: it is the attention sink,
the same in every text, so steering it perturbs everything and carries nothing of either domain.
During cached decoding the hook sees the prompt once (the whole padded batch), then one new
position per step; "new" and "all" steer those steps, "roles" and "prompt" leave them alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from torch import Tensor

from analoglock.generation import Generation, generate, hf_hook_sites
from analoglock.hooks import validate_hook
from analoglock.tokens import encode_texts, pad_ids, prepend_bos_id

POSITIONS = ("roles", "prompt", "new", "all")
DECODE_POSITIONS = ("new", "all")  # rules that also steer every cached decoding step

Hook = tuple[str, Callable]  # (hook name, fn), as model.hooks(fwd_hooks=...) takes them


class SteeringError(ValueError):
    """An intervention that cannot run as asked (bad strength, hook, vector or positions)."""


def check_positions(positions: str) -> str:
    """`positions` if it names a rule, else an error listing the rules."""
    if positions not in POSITIONS:
        raise SteeringError(
            f"positions must be one of {', '.join(POSITIONS)}, not {positions!r} "
            "(roles: the prompt's role words; prompt: every prompt token; new: the last prompt "
            "token and every generated one; all: every token)."
        )
    return positions


# ---------------------------------------------------------------- positions


@dataclass(frozen=True)
class RowPositions:
    """Where one unpadded row's tokens are: `n_prompt` prompt tokens (BOS included), then the
    continuation up to `n_total`; `roles` are token indices of role mentions in the prompt;
    `skip_first` keeps the BOS at index 0 unsteered."""

    n_prompt: int
    n_total: int
    roles: tuple[int, ...] = ()
    skip_first: bool = True

    def indices(self, positions: str) -> list[int]:
        """Token indices of this row that `positions` steers (in the unpadded row)."""
        start = 1 if self.skip_first else 0
        if positions == "all":
            idx = range(start, self.n_total)
        elif positions == "prompt":
            idx = range(start, self.n_prompt)
        elif positions == "new":
            idx = range(max(start, self.n_prompt - 1), self.n_total)
        else:
            idx = [r for r in self.roles if start <= r < self.n_prompt]
        return list(idx)


def position_mask(
    positions: str, rows: Sequence[RowPositions], width: int, side: str
) -> Annotated[Tensor, "batch pos"]:
    """Boolean [batch, width] mask of the steered tokens of a batch padded on `side`."""
    check_positions(positions)
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        if row.n_total > width:
            raise ValueError(f"row {i} has {row.n_total} tokens but the batch is {width} wide")
        offset = width - row.n_total if side == "left" else 0
        idx = row.indices(positions)
        if idx:
            mask[i, torch.tensor(idx) + offset] = True
    return mask


# ---------------------------------------------------------------- hook functions


def _where(positions: str, mask: Tensor | None) -> Callable[[Tensor], Tensor | None]:
    """For each call of a hook: the [batch, pos] mask to steer, or None for every position.

    With a mask, the first call is the full pass it was built for; every later call must be a
    cached decoding step (one position), steered only for the "new" and "all" rules. Without one
    (a hook used on its own): "all" steers everything; "new" the last position of a wide call
    (left-padded prompts end together) and every one-position call.
    """
    decode = positions in DECODE_POSITIONS
    calls = [0]

    def where(x: Tensor) -> Tensor | None:
        first = calls[0] == 0
        calls[0] += 1
        batch, width = x.shape[0], x.shape[1]
        if mask is None:
            if positions == "all" or width == 1:
                return None
            out = torch.zeros(batch, width, dtype=torch.bool, device=x.device)
            out[:, -1] = True
            return out
        if first:
            if tuple(mask.shape) != (batch, width):
                raise SteeringError(
                    f"position mask is {tuple(mask.shape)} but the hook saw a [{batch}, {width}] "
                    "batch; build the mask for the batch it steers."
                )
            return mask.to(x.device)
        if width != 1:
            raise SteeringError(
                f"a masked hook saw a second full pass ([{batch}, {width}]); build one hook per "
                "forward pass or generation call."
            )
        return None if decode else torch.zeros(batch, 1, dtype=torch.bool, device=x.device)

    return where


def add_vector_hook(
    vector: Annotated[Tensor, "d_model"],
    scale: float,
    positions: str = "all",
    mask: Annotated[Tensor, "batch pos"] | None = None,
) -> Callable:
    """Hook fn adding `scale * vector` at the steered positions (`mask`, see `position_mask`).

    Without a mask only "all" and "new" make sense (see `_where`); "roles" and "prompt" need one.
    """
    check_positions(positions)
    if mask is None and positions not in DECODE_POSITIONS:
        raise SteeringError(f"positions={positions!r} needs a position mask (see position_mask)")
    delta = scale * vector.detach()
    where = _where(positions, mask)
    cache: dict[tuple, Tensor] = {}

    def hook_fn(x: Tensor, hook=None) -> Tensor:
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = delta.to(device=x.device, dtype=x.dtype)
        m = where(x)
        if m is None:
            return x + cache[key]
        return x + m.unsqueeze(-1).to(x.dtype) * cache[key] if m.any() else x

    return hook_fn


def apply_map_hook(
    mapper: torch.nn.Module,
    alpha: float,
    positions: str = "all",
    mask: Annotated[Tensor, "batch pos"] | None = None,
    stats: dict[str, float] | None = None,
) -> Callable:
    """Hook fn moving steered activations a fraction `alpha` toward M(x): x + alpha (M(x) - x).

    The map runs only on the steered rows. `stats`, when given, accumulates the displacement the
    hook applied ("norm_sum" of ||alpha (M(x) - x)|| and "n" rows) so a caller can compare it with
    the norm of the vectors it is controlled against.
    """
    check_positions(positions)
    if mask is None and positions not in DECODE_POSITIONS:
        raise SteeringError(f"positions={positions!r} needs a position mask (see position_mask)")
    where = _where(positions, mask)
    p = next(mapper.parameters(), None)

    def displace(rows: Tensor) -> Tensor:
        y = mapper(rows.to(p.dtype) if p is not None else rows).to(rows.dtype)
        d = alpha * (y - rows)
        if stats is not None:
            stats["norm_sum"] = stats.get("norm_sum", 0.0) + float(d.float().norm(dim=-1).sum())
            stats["n"] = stats.get("n", 0.0) + d.shape[0]
        return rows + d

    def hook_fn(x: Tensor, hook=None) -> Tensor:
        m = where(x)
        if m is None:
            return displace(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        if not m.any():
            return x
        out = x.clone()
        out[m] = displace(x[m])
        return out

    return hook_fn


@contextmanager
def steer(model, hook: str, fn: Callable) -> Iterator[Any]:
    """Run `model` with `fn` attached at `hook`; the hook is removed on exit, even on error."""
    validate_hook(model, hook)
    with model.hooks(fwd_hooks=[(hook, fn)]):
        yield model


# ---------------------------------------------------------------- one intervention


@dataclass(frozen=True)
class Steering:
    """One intervention, checked: a vector (`x + strength * vector`) or a map
    (`x + strength * (M(x) - x)`) at `hook`, on the tokens `positions` names; or a sum of such
    interventions (`parts`, applied in order, each on its own positions; `combined_steering`)."""

    kind: str  # "vector" | "map" | "sum"
    hook: str
    positions: str
    strength: float  # the vector's scale, or the map's alpha
    vector: Tensor | None = None
    mapper: torch.nn.Module | None = None
    stats: dict[str, float] = field(default_factory=dict, compare=False, repr=False)
    parts: tuple[Steering, ...] = ()

    def hooks(self, rows: Sequence[RowPositions], width: int, side: str) -> list[Hook]:
        """Fresh hooks for one forward pass or one generation call over a batch of `rows`
        padded on `side` to `width` (each part masks its own positions)."""
        if self.kind == "sum":
            return [h for part in self.parts for h in part.hooks(rows, width, side)]
        mask = position_mask(self.positions, rows, width, side)
        if self.kind == "vector":
            return [(self.hook, add_vector_hook(self.vector, self.strength, self.positions, mask))]
        fn = apply_map_hook(self.mapper, self.strength, self.positions, mask, self.stats)
        return [(self.hook, fn)]

    @property
    def norm(self) -> float | None:
        """||scale * vector|| for a vector; None for a map (its displacement depends on x). A sum of
        vectors: the norm of the whole push at a token every part steers, sqrt over hooks of
        ||sum of the vectors at that hook||^2 (a multi-layer control vector's norm); None with a
        map among its parts."""
        if self.kind == "vector":
            return abs(self.strength) * float(self.vector.norm())
        if self.kind == "map" or any(p.kind == "map" for p in self.parts):
            return None
        at: dict[str, Tensor] = {}
        for p in self.parts:
            at[p.hook] = at.get(p.hook, 0.0) + p.strength * p.vector.double()
        return math.sqrt(sum(float(v.norm()) ** 2 for v in at.values()))

    def describe(self) -> dict[str, Any]:
        """Plain JSON: kind, hook, positions, strength (as alpha or scale), norm. A sum: its hooks,
        norm and parts, and the scale and positions its parts share, if they share them."""
        if self.kind == "sum":
            out = {"kind": "sum", "hooks": list(dict.fromkeys(p.hook for p in self.parts))}
            for key, values in (("positions", {p.positions for p in self.parts}),
                                ("scale", {p.strength for p in self.parts})):  # fmt: skip
                if len(values) == 1 and all(p.kind == "vector" for p in self.parts):
                    out[key] = values.pop()
            out["norm"] = self.norm
            return {**out, "parts": [part.describe() for part in self.parts]}
        out = {"kind": self.kind, "hook": self.hook, "positions": self.positions}
        out["alpha" if self.kind == "map" else "scale"] = self.strength
        out["norm"] = self.norm
        if self.kind == "map" and self.stats.get("n"):
            out["applied_norm"] = self.stats["norm_sum"] / self.stats["n"]
        return out


def combined_steering(*parts: Steering) -> Steering:
    """The interventions `parts` at once, applied in the order given (a map first sees the
    unsteered activations it was fit on): a map at the role tokens plus a vector everywhere, or
    one vector at each of several layers. Sums flatten; a sum has no single hook, positions or
    strength (its fields are empty: `describe` gives what its parts share)."""
    flat = [q for p in parts for q in (p.parts if p.kind == "sum" else (p,))]
    if not flat:
        raise SteeringError("combined_steering needs at least one intervention.")
    return Steering("sum", "", "", math.nan, parts=tuple(flat))


def _check_strength(name: str, value: float) -> float:
    """A finite float, else an error before anything is generated."""
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise SteeringError(f"{name}={value!r} is not a number") from err
    if not math.isfinite(value):
        raise SteeringError(f"{name}={value} is not finite; give a finite number.")
    return value


def vector_steering(
    model, hook: str, vector: Annotated[Tensor, "d_model"], scale: float, positions: str = "all"
) -> Steering:
    """Add `scale * vector` at `hook`; refuses a non-finite scale or vector, or a wrong length."""
    validate_hook(model, hook)
    check_positions(positions)
    scale = _check_strength("scale", scale)
    d_model = int(model.cfg.d_model)
    v = torch.as_tensor(vector).detach().float().cpu()
    if v.shape != (d_model,):
        raise SteeringError(
            f"the steering vector has shape {tuple(v.shape)} but {hook} holds d_model={d_model} "
            "values per token; give a vector of that length (made at this model's hook)."
        )
    if not torch.isfinite(v).all():
        raise SteeringError("the steering vector holds NaN or inf values.")
    return Steering("vector", hook, positions, scale, vector=v)


def map_steering(
    model,
    mapper: torch.nn.Module,
    map_hook: str,
    alpha: float,
    positions: str = "roles",
    hook: str | None = None,
    allow_extrapolation: bool = False,
) -> Steering:
    """Move activations at `hook` (default: `map_hook`, where the map was trained) toward M(x).

    Refuses a map applied at another hook than its own (it was fit to that hook's geometry),
    alpha outside [0, 1] unless `allow_extrapolation` (past M(x), or away from it, the map was
    never fit), a non-finite alpha, and a map whose output is not the shape of its input.
    """
    hook = map_hook if hook is None else hook
    if hook != map_hook:
        raise SteeringError(
            f"this map was trained at {map_hook!r} and cannot be applied at {hook!r}; steer at "
            f"{map_hook!r} or train a map at {hook!r}."
        )
    validate_hook(model, hook)
    check_positions(positions)
    alpha = _check_strength("alpha", alpha)
    if not (0.0 <= alpha <= 1.0) and not allow_extrapolation:
        raise SteeringError(
            f"alpha={alpha} is outside [0, 1]: x + alpha (M(x) - x) then leaves the segment from x "
            "to M(x) the map was fit on. Set allow_extrapolation=true to do it anyway."
        )
    d_model = int(model.cfg.d_model)
    p = next(mapper.parameters(), None)
    probe = torch.zeros(2, d_model, dtype=p.dtype if p is not None else torch.float32)
    if p is not None:
        probe = probe.to(p.device)
    with torch.no_grad():
        try:
            out = mapper(probe)
        except RuntimeError as err:
            raise SteeringError(
                f"the map does not accept d_model={d_model} activations from {hook} ({err})"
            ) from err
    if tuple(out.shape) != tuple(probe.shape):
        raise SteeringError(
            f"the map sends [.., {d_model}] to {tuple(out.shape)}; steering needs M(x) the shape "
            "of x."
        )
    return Steering("map", hook, positions, alpha, mapper=mapper)


# ---------------------------------------------------------------- running under a steering


def steered_generate(
    model,
    prompts: Sequence[str],
    steering: Steering | None = None,
    roles: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 40,
    batch_size: int = 16,
) -> Generation:
    """Greedy continuations of `prompts` with `steering` active (None: unsteered).

    `roles[i]` are the token positions of prompt i's role mentions (`prompts.role_token_positions`),
    needed for positions="roles". Batches are left-padded as `generate` pads them; each batch
    gets fresh hooks whose mask covers exactly its prompt pass.
    """
    prompts = list(prompts)
    roles = [()] * len(prompts) if roles is None else [tuple(r) for r in roles]
    if len(roles) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(roles)} role position lists")
    skip = prepend_bos_id(model) is not None
    completions: list[str] = []
    new_tokens: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        hooks: list[Hook] = []
        if steering is not None:
            lengths = [len(ids) for ids in encode_texts(model, chunk)]
            rows = [RowPositions(n, n, roles[start + i], skip) for i, n in enumerate(lengths)]
            hooks = steering.hooks(rows, max(lengths), "left")
        # residual-stream hooks run on the HF modules (`generation.hf_hooks`): ~1.5x faster
        direct = hf_hook_sites(model, [name for name, _ in hooks]) is not None
        gen = generate(model, chunk, max_new_tokens=max_new_tokens, fwd_hooks=hooks,
                       batch_size=len(chunk), hook_points=not direct)  # fmt: skip
        completions += gen.completions
        new_tokens += gen.new_tokens
    return Generation(prompts, completions, new_tokens)


def steered_logits(
    model,
    rows: Sequence[Sequence[int]],
    steering: Steering | None = None,
    positions: Sequence[RowPositions] | None = None,
    batch_size: int = 16,
) -> Iterator[tuple[int, Annotated[Tensor, "pos d_vocab"]]]:
    """(row index, float32 logits [len, d_vocab]) of each id row, teacher-forced under `steering`,
    in no particular order of rows.

    Rows are batched shortest first and right-padded, which keeps every real position's logits
    equal to the row's own unpadded run (causal attention never looks ahead at the pads); sorting
    keeps the pads few (role-transfer prefixes run from a dozen to hundreds of tokens).
    `positions[i]` says where row i's prompt ends and where its roles are (default: the whole
    row is prompt, no roles).
    """
    pad = model.tokenizer.pad_token_id
    device = model.cfg.device
    skip = prepend_bos_id(model) is not None
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = [rows[i] for i in index]
        ids, attn = pad_ids(batch, pad)
        hooks: list[Hook] = []
        if steering is not None:
            where = (
                [positions[i] for i in index]
                if positions is not None
                else [RowPositions(len(r), len(r), (), skip) for r in batch]
            )
            hooks = steering.hooks(where, ids.shape[1], "right")
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(ids.to(device), attention_mask=attn.to(device))
        for k, (i, r) in enumerate(zip(index, batch, strict=True)):
            yield i, logits[k, : len(r)].float().cpu()


def steered_logprobs(
    model,
    rows: Sequence[Sequence[int]],
    steering: Steering | None = None,
    positions: Sequence[RowPositions] | None = None,
    batch_size: int = 16,
) -> Iterator[tuple[int, Annotated[Tensor, "pos d_vocab"]]]:
    """(row index, float32 log-probs [len, d_vocab]) of each id row: `steered_logits`, each row's
    real positions log-softmaxed (the pads never are)."""
    for i, logits in steered_logits(model, rows, steering, positions, batch_size):
        yield i, torch.log_softmax(logits, dim=-1)


# ---------------------------------------------------------------- controls


def random_control(vector: Annotated[Tensor, "d_model"], seed: int) -> Annotated[Tensor, "d_model"]:
    """A random direction (seeded, isotropic) with the same norm, dtype and device as `vector`."""
    gen = torch.Generator().manual_seed(int(seed))
    v = vector.detach()
    d = torch.randn(v.shape, generator=gen, dtype=torch.float64)
    d = d * (v.double().norm() / d.norm())
    return d.to(dtype=v.dtype, device=v.device)


def covariance_directions(
    cov: Annotated[Tensor, "d_model d_model"], n: int, norm: float, seed: int = 0
) -> Annotated[Tensor, "n d_model"]:
    """`n` directions z ~ N(0, cov), each rescaled to `norm` (seeded).

    Drawn from the activations' own covariance, not isotropically: an isotropic direction spends
    most of its norm in dimensions the residual stream barely uses, so it is a weak control; these
    move the stream the way its natural variation does.
    """
    cov = cov.detach().double().cpu()
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise SteeringError(
            f"cov must be a square [d_model, d_model] matrix, not {tuple(cov.shape)}"
        )
    if n < 1:
        raise SteeringError(f"n={n}: draw at least one random direction.")
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    root = evecs * evals.clamp(min=0).sqrt()  # cov = root root^T, PSD part only
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(n, cov.shape[0], generator=gen, dtype=torch.float64) @ root.T
    lengths = z.norm(dim=-1, keepdim=True)
    if (lengths == 0).any():
        raise SteeringError("cov is zero: the artifact's cov_a holds no variance to draw from.")
    return (z / lengths * float(norm)).float()


__all__ = [
    "DECODE_POSITIONS",
    "POSITIONS",
    "RowPositions",
    "Steering",
    "SteeringError",
    "add_vector_hook",
    "apply_map_hook",
    "check_positions",
    "combined_steering",
    "covariance_directions",
    "map_steering",
    "position_mask",
    "random_control",
    "steer",
    "steered_generate",
    "steered_logits",
    "steered_logprobs",
    "vector_steering",
]
