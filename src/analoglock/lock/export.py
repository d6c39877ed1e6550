"""Portable relation artifacts: what a lock run leaves behind for steering and analysis.

Owns the file names and the format: `relation.safetensors` holds the map's tensors plus the
additive relation vector(s), and its metadata (also written as `cfg.json`) records the mapper kind
and constructor args, the model's identity, the hook and the dims. Loading never unpickles
anything (safetensors + JSON only) and refuses an artifact made on a different model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from analoglock.atomic import save_tensors, write_json

RELATION_FILE = "relation.safetensors"
CFG_FILE = "cfg.json"
METRICS_FILE = "metrics.json"
EXPORT_VERSION = 1
_MAP_PREFIX = "map."  # map tensors live beside the relation vectors under this prefix
_META_KEY = "analoglock"


class ArtifactError(ValueError):
    """A relation artifact that is missing, not ours, or made for another model."""


@dataclass
class Relation:
    """A learned relation ready to apply: the map, the vector to add, and where it came from."""

    cfg: dict[str, Any]
    mapper: torch.nn.Module | None
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def hook(self) -> str:
        """Hook name the relation was learned at (and is applied at)."""
        return self.cfg["hook"]

    @property
    def vector(self) -> torch.Tensor:
        """The learned additive relation r (domain A -> domain B)."""
        return self.vectors["relation"]


def save_relation(
    out_dir: str | Path,
    mapper,
    vectors: dict[str, torch.Tensor],
    *,
    model: dict[str, Any],
    hook: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `relation.safetensors` (+ `cfg.json`) atomically; `vectors` must include "relation"."""
    if "relation" not in vectors:
        raise ValueError('vectors must include "relation", the additive A -> B vector')
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "version": EXPORT_VERSION,
        "kind": mapper.kind,
        "mapper": mapper.config(),
        "model": model,
        "hook": hook,
        "d_model": int(model["d_model"]),
        "vectors": sorted(vectors),
        **(extra or {}),
    }
    tensors = {k: v.detach().float().cpu().clone() for k, v in vectors.items()}  # no shared storage
    for k, v in mapper.export_tensors().items():
        tensors[_MAP_PREFIX + k] = v.detach().float().cpu().clone()
    path = out / RELATION_FILE
    save_tensors(path, tensors, metadata={_META_KEY: json.dumps(cfg)})
    write_json(out / CFG_FILE, cfg)
    return path


def _relation_path(path: str | Path) -> Path:
    """Accept a run directory or the relation file itself."""
    p = Path(path)
    p = p / RELATION_FILE if p.is_dir() else p
    if not p.exists():
        raise ArtifactError(
            f"No relation artifact at {p} (expected a run directory holding {RELATION_FILE})."
        )
    return p


def read_relation_cfg(path: str | Path) -> dict[str, Any]:
    """The artifact's config, read from the safetensors header alone."""
    p = _relation_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for foreign files
        raise ArtifactError(
            f"{p} is not a safetensors file written by analoglock ({err})."
        ) from err
    if _META_KEY not in meta:
        raise ArtifactError(
            f"{p} is a safetensors file but not an analoglock relation (no '{_META_KEY}' metadata)."
        )
    cfg = json.loads(meta[_META_KEY])
    if cfg.get("version") != EXPORT_VERSION:
        raise ArtifactError(
            f"{p}: relation format version {cfg.get('version')} is not {EXPORT_VERSION}."
        )
    return cfg


def check_same_model(cfg: dict[str, Any], model) -> None:
    """Raise if the artifact was made on a different model (hash or dims differ)."""
    from analoglock.model import model_info

    info = model_info(model)
    made = cfg["model"]
    if made.get("d_model") != info.d_model:
        raise ArtifactError(
            f"This relation has d_model={made.get('d_model')} (model {made.get('spec')!r}) but the "
            f"loaded model has d_model={info.d_model} ({info.spec!r})."
        )
    if made.get("sha256") != info.sha256:
        raise ArtifactError(
            f"This relation was learned on model {made.get('spec')!r} (sha {str(made.get('sha256'))[:12]}) "
            f"but the loaded model is {info.spec!r} (sha {info.sha256[:12]}); load the same model "
            "(e.g. model.spec=" + str(made.get("spec")) + ")."
        )


def load_relation(path: str | Path, model=None, **bases) -> Relation:
    """Load a relation artifact; with `model`, first check it was made on that model.

    `bases` (basis_a=, basis_b=) are needed only for maps that live in a feature basis's code space.
    """
    from analoglock.lock.maps import mapper_from_tensors

    p = _relation_path(path)
    cfg = read_relation_cfg(p)
    if model is not None:
        check_same_model(cfg, model)
    with safe_open(str(p), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    map_tensors = {
        k[len(_MAP_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_MAP_PREFIX)
    }
    vectors = {k: v for k, v in tensors.items() if not k.startswith(_MAP_PREFIX)}
    if cfg.get("basis") and not bases:
        from analoglock.bases import load_basis

        if not Path(cfg["basis"]).exists():
            raise ArtifactError(
                f"{p} is a map in the code space of the basis at {cfg['basis']}, which no longer "
                "exists; pass basis_a= (the same basis, loaded with analoglock.bases.load_basis)."
            )
        bases = {"basis_a": load_basis(cfg["basis"])}
    mapper = mapper_from_tensors(cfg["kind"], cfg["mapper"], map_tensors, **bases)
    return Relation(cfg, mapper, vectors)
