"""Path-specific effects: the part of an intervention's effect that travels through chosen routes.

Between h1 and h2 the residual stream is a sum: what h2 reads (its read site: the residual it
is computed from, e.g. blocks.M.hook_resid_mid for an MLP hook of block M) equals the residual h1
writes, plus the output of every attention and MLP layer in between. A route is one of those
components (`blocks.L.attn`, `blocks.L.mlp`) or `direct` (the residual connection itself carrying
the delta from h1 straight to h2's read site). For a set R of routes, the path-specific run is the
intervened run in which

  * every component NOT in R has its output frozen at its clean value (a hook on its
    hook_attn_out / hook_mlp_out writes the clean output back, so it cannot pass the change on,
    and gradients through it are cut too), and
  * if `direct` is not in R, the delta is subtracted again at h2's read site,

so the change reaching h2 is what flows through the components of R, each of which sees the
intervened residual (including changes from R components before it). Then E_R[i, j] is defined
exactly as in `exact`, from this run. Consequences, asserted by the tests: R = all routes gives
the total effect, R = {} gives exactly zero. Effects of disjoint route sets are NOT assumed to add
up to the total (components interact through the non-linear norms and MLPs); measure the sum if
you need it. Spec strings: `all`, `none`, or a comma list of `direct`, `attn` (every attention
layer in between), `mlp` (every MLP in between), `blocks.L.attn`, `blocks.L.mlp`, `blocks.L` (both).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from analoglock.patching.segment import PatchSetupError, Segment

_COMPONENT = re.compile(r"^blocks\.(\d+)(?:\.(attn|mlp))?$")


@dataclass(frozen=True)
class Routes:
    """Components the effect may flow through, and whether the direct residual path is open."""

    components: frozenset[str]
    direct: bool
    spec: str = ""


def parse_routes(spec: str | Sequence[str] | None, segment: Segment) -> Routes | None:
    """Routes for a spec (see the module docstring); None for `all` (no freezing at all)."""
    if spec is None:
        return None
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    items = [s for s in items if s]
    if items == ["all"]:
        return None
    if segment.h1.name == segment.h2.name:
        raise PatchSetupError(
            f"Path-specific effects need h2 after h1; both are {segment.h1.name!r}"
        )
    between = segment.components()
    valid = ["all", "none", "direct", "attn", "mlp", *between]
    chosen: set[str] = set()
    direct = False
    for item in [] if items == ["none"] else items:
        if item == "direct":
            direct = True
        elif item in ("attn", "mlp"):
            chosen |= {c for c in between if c.endswith("." + item)}
        elif m := _COMPONENT.match(item):
            names = [item] if m.group(2) else [f"{item}.attn", f"{item}.mlp"]
            missing = [n for n in names if n not in between]
            if m.group(2) and missing:
                raise PatchSetupError(
                    f"Route {item!r} is not between {segment.h1.name} and {segment.h2.name}; "
                    f"valid routes: {', '.join(valid)}"
                )
            present = [n for n in names if n in between]
            if not present:
                raise PatchSetupError(
                    f"Block {item!r} has no component between {segment.h1.name} and "
                    f"{segment.h2.name}; valid routes: {', '.join(valid)}"
                )
            chosen |= set(present)
        else:
            raise PatchSetupError(f"Unknown route {item!r}; valid routes: {', '.join(valid)}")
    return Routes(frozenset(chosen), direct, spec=",".join(items) or "none")


def all_routes(segment: Segment) -> Routes:
    """Every component plus the direct path, spelled out (equals no freezing)."""
    return Routes(frozenset(segment.components()), True, spec="all(explicit)")
