"""The constraint spec of a search by shape: its format, validation and errors.

Owns the spec (a list of dicts, e.g. from Hydra YAML; `slots` names variables bound to distinct
candidates) and `Constraint`, its validated form. Knows nothing of scores or candidates (see
shape.py).

    - {type: parallelogram, slots: [king, queen, man, woman]}   # king - queen = man - woman
    - {type: orthogonal, slots: [a, b]}                        # pairwise orthogonal
    - {type: orthogonal, slots: [count], to: [gender]}         # orthogonal to fixed vectors/slots
    - {type: aligned, slots: [a], to: [b]}                     # parallel (either sign)
    - {type: ordered, slot: count, order: [one, two, three]}   # codes ordered across input groups
      (optional: direction: increasing | decreasing | either (default); weight: > 0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TYPES = ("parallelogram", "orthogonal", "aligned", "ordered")
DIRECTIONS = ("increasing", "decreasing", "either")
_KEYS = {
    "parallelogram": {"type", "slots", "weight"},
    "orthogonal": {"type", "slots", "slot", "to", "weight"},
    "aligned": {"type", "slots", "slot", "to", "weight"},
    "ordered": {"type", "slots", "slot", "order", "direction", "weight"},
}


class ShapeSpecError(ValueError):
    """A constraint spec that does not follow the format in this module's docstring."""


@dataclass(frozen=True)
class Constraint:
    """One validated constraint over named slots."""

    type: str
    slots: tuple[str, ...]
    to: tuple[str, ...] = ()
    order: tuple[str, ...] = ()
    direction: str = "either"
    weight: float = 1.0


# ---------------------------------------------------------------- spec


def _plain(spec: Any) -> Any:
    """OmegaConf containers to plain Python."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(spec, (DictConfig, ListConfig)):
            return OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return spec


def _names(value: Any, where: str, key: str) -> tuple[str, ...]:
    """A list of non-empty strings (a single string is one name)."""
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not value:
        raise ShapeSpecError(f"{where}: {key!r} must be a non-empty list of names, got {value!r}")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise ShapeSpecError(
            f"{where}: every entry of {key!r} must be a non-empty string, got {value!r}"
        )
    return tuple(value)


def parse_constraints(
    spec: Any, fixed: Sequence[str] = (), labels: Sequence[str] | None = None
) -> list[Constraint]:
    """Validate a constraint spec; `fixed` are the names `to:` may use besides slots, `labels` the
    input groups `order:` may use (None: no codes given)."""
    spec = _plain(spec)
    if isinstance(spec, Mapping):
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ShapeSpecError(
            "constraints must be a non-empty list of dicts, e.g. "
            "[{type: parallelogram, slots: [a, b, c, d]}]"
        )
    out: list[Constraint] = []
    for i, raw in enumerate(spec):
        where = f"constraint {i}"
        if not isinstance(raw, Mapping):
            raise ShapeSpecError(f"{where}: expected a dict with a 'type', got {raw!r}")
        kind = raw.get("type")
        if kind not in TYPES:
            raise ShapeSpecError(f"{where}: unknown type {kind!r}; valid types: {', '.join(TYPES)}")
        where = f"constraint {i} ({kind})"
        extra = set(raw) - _KEYS[kind]
        if extra:
            raise ShapeSpecError(
                f"{where}: unknown keys {sorted(extra)}; valid keys: {sorted(_KEYS[kind])}"
            )
        if ("slot" in raw) == ("slots" in raw):
            raise ShapeSpecError(f"{where}: give exactly one of 'slot' or 'slots'")
        slots = _names(raw.get("slots", raw.get("slot")), where, "slots")
        if len(set(slots)) != len(slots):
            raise ShapeSpecError(f"{where}: slots repeat a name: {list(slots)}")
        weight = raw.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise ShapeSpecError(f"{where}: weight must be a number > 0, got {weight!r}")
        to: tuple[str, ...] = ()
        order: tuple[str, ...] = ()
        direction = "either"
        if kind == "parallelogram" and len(slots) != 4:
            raise ShapeSpecError(
                f"{where}: needs exactly 4 slots [a, b, c, d] (a - b = c - d), got {len(slots)}"
            )
        if kind in ("orthogonal", "aligned"):
            to = _names(raw["to"], where, "to") if "to" in raw else ()
            if len(slots) < 2 and not to:
                raise ShapeSpecError(f"{where}: needs 2+ slots, or slots plus 'to: [names]'")
            if set(to) & set(slots):
                raise ShapeSpecError(
                    f"{where}: 'to' repeats its own slots {sorted(set(to) & set(slots))}"
                )
        if kind == "ordered":
            if len(slots) != 1:
                raise ShapeSpecError(
                    f"{where}: takes one slot (the feature whose codes are ordered)"
                )
            if labels is None:
                raise ShapeSpecError(
                    f"{where}: needs codes and input labels (pass codes= and labels=)"
                )
            order = _names(raw.get("order"), where, "order")
            if len(order) < 2 or len(set(order)) != len(order):
                raise ShapeSpecError(
                    f"{where}: 'order' needs 2+ distinct groups, got {list(order)}"
                )
            unknown = [g for g in order if g not in set(labels)]
            if unknown:
                raise ShapeSpecError(
                    f"{where}: groups {unknown} are not input labels; labels: {sorted(set(labels))}"
                )
            direction = raw.get("direction", "either")
            if direction not in DIRECTIONS:
                raise ShapeSpecError(
                    f"{where}: direction {direction!r}; valid: {', '.join(DIRECTIONS)}"
                )
        out.append(Constraint(kind, slots, to, order, direction, float(weight)))
    slot_names = {s for c in out for s in c.slots}
    for i, c in enumerate(out):
        bad = [t for t in c.to if t not in slot_names and t not in set(fixed)]
        if bad:
            raise ShapeSpecError(
                f"constraint {i} ({c.type}): 'to' names {bad} are neither slots nor fixed vectors; "
                f"slots: {sorted(slot_names)}; fixed vectors: {sorted(fixed) or 'none given'}"
            )
    return out


def slot_order(constraints: Sequence[Constraint]) -> list[str]:
    """Every slot, in order of first appearance."""
    return list(dict.fromkeys(s for c in constraints for s in c.slots))
