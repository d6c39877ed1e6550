"""Portable lock artifacts: what a lock run leaves behind for steering and analysis.

Owns the file names and the format: `lock.safetensors` holds the learned map's tensors, the
shuffled-pairs control map's tensors (when the run trained one), and named vectors (`learned`: the
map's mean displacement on training A rows; `meandiff`; `center`; `cov_a`: the covariance of the
training A activations, from which matched random controls are drawn). Its metadata (also written
as `cfg.json`) records the mapper kind and constructor args, the model's identity, the hook and
the dims. Loading never unpickles anything (safetensors + JSON only), refuses an artifact made on
a different model, and refuses non-finite tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from analoglock.atomic import save_tensors, write_json

ARTIFACT_FILE = "lock.safetensors"
CFG_FILE = "cfg.json"
METRICS_FILE = "metrics.json"
EXPORT_VERSION = 2  # 2: lock.safetensors, "learned" vector, optional control map
_MAP_PREFIX = "map."  # the learned map's tensors live beside the vectors under this prefix
_CONTROL_PREFIX = "control_map."  # the shuffled-pairs control map, same kind and config
_META_KEY = "analoglock"


class ArtifactError(ValueError):
    """A lock artifact that is missing, not ours, corrupt, or made for another model."""


@dataclass
class LockArtifact:
    """A learned lock ready to apply: the map, its control, named vectors, and where it came from."""

    cfg: dict[str, Any]
    mapper: torch.nn.Module
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    control_mapper: torch.nn.Module | None = None

    @property
    def hook(self) -> str:
        """Hook name the map was learned at (and is applied at)."""
        return self.cfg["hook"]

    @property
    def vector(self) -> torch.Tensor:
        """The learned map's mean displacement M(x) - x over training A rows (a constant vector)."""
        return self.vectors["learned"]


def save_artifact(
    out_dir: str | Path,
    mapper,
    vectors: dict[str, torch.Tensor],
    *,
    model: dict[str, Any],
    hook: str,
    control_mapper=None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `lock.safetensors` (+ `cfg.json`) atomically; `vectors` must include "learned"."""
    if "learned" not in vectors:
        raise ValueError('vectors must include "learned", the map\'s mean A -> B displacement')
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
        "control_map": control_mapper is not None,
        **(extra or {}),
    }
    tensors = {k: v.detach().float().cpu().clone() for k, v in vectors.items()}  # no shared storage
    for k, v in mapper.export_tensors().items():
        tensors[_MAP_PREFIX + k] = v.detach().float().cpu().clone()
    if control_mapper is not None:
        for k, v in control_mapper.export_tensors().items():
            tensors[_CONTROL_PREFIX + k] = v.detach().float().cpu().clone()
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"Refusing to save non-finite tensors {bad} to {out / ARTIFACT_FILE}.")
    path = out / ARTIFACT_FILE
    save_tensors(path, tensors, metadata={_META_KEY: json.dumps(cfg)})
    write_json(out / CFG_FILE, cfg)
    return path


def _artifact_path(path: str | Path) -> Path:
    """Accept a run directory or the artifact file itself."""
    p = Path(path)
    p = p / ARTIFACT_FILE if p.is_dir() else p
    if not p.exists():
        raise ArtifactError(
            f"No lock artifact at {p} (expected a run directory holding {ARTIFACT_FILE}, "
            "written by analoglock-train)."
        )
    return p


def read_artifact_cfg(path: str | Path) -> dict[str, Any]:
    """The artifact's config, read from the safetensors header alone."""
    p = _artifact_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for foreign files
        raise ArtifactError(
            f"{p} is not a safetensors file written by analoglock ({err})."
        ) from err
    if _META_KEY not in meta:
        raise ArtifactError(
            f"{p} is a safetensors file but not an analoglock lock artifact (no '{_META_KEY}' "
            "metadata)."
        )
    cfg = json.loads(meta[_META_KEY])
    if cfg.get("version") != EXPORT_VERSION:
        raise ArtifactError(
            f"{p}: lock artifact format version {cfg.get('version')} is not {EXPORT_VERSION}; "
            "retrain it with this version of analoglock-train."
        )
    return cfg


def check_same_model(cfg: dict[str, Any], model) -> None:
    """Raise if the artifact was made on a different model (hash or dims differ)."""
    from analoglock.model import model_info

    info = model_info(model)
    made = cfg["model"]
    if made.get("d_model") != info.d_model:
        raise ArtifactError(
            f"This lock has d_model={made.get('d_model')} (model {made.get('spec')!r}) but the "
            f"loaded model has d_model={info.d_model} ({info.spec!r})."
        )
    if made.get("sha256") != info.sha256:
        raise ArtifactError(
            f"This lock was learned on model {made.get('spec')!r} (sha {str(made.get('sha256'))[:12]}) "
            f"but the loaded model is {info.spec!r} (sha {info.sha256[:12]}); load the same model "
            "(e.g. model.spec=" + str(made.get("spec")) + ")."
        )


def load_artifact(path: str | Path, model=None, **bases) -> LockArtifact:
    """Load a lock artifact; with `model`, first check it was made on that model.

    `bases` (basis_a=, basis_b=) are needed only for maps that live in a feature basis's code space.
    Every tensor must be finite: a NaN map would steer silently into garbage.
    """
    from analoglock.lock.maps import mapper_from_tensors

    p = _artifact_path(path)
    cfg = read_artifact_cfg(p)
    if model is not None:
        check_same_model(cfg, model)
    with safe_open(str(p), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ArtifactError(f"{p}: tensors {bad} hold NaN or inf; the artifact is corrupt.")

    def strip(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    vectors = {k: v for k, v in tensors.items() if not k.startswith((_MAP_PREFIX, _CONTROL_PREFIX))}
    if cfg.get("basis") and not bases:
        from analoglock.bases import load_basis

        if not Path(cfg["basis"]).exists():
            raise ArtifactError(
                f"{p} is a map in the code space of the basis at {cfg['basis']}, which no longer "
                "exists; pass basis_a= (the same basis, loaded with analoglock.bases.load_basis)."
            )
        bases = {"basis_a": load_basis(cfg["basis"])}
    mapper = mapper_from_tensors(cfg["kind"], cfg["mapper"], strip(_MAP_PREFIX), **bases)
    control = None
    if cfg.get("control_map"):
        control = mapper_from_tensors(cfg["kind"], cfg["mapper"], strip(_CONTROL_PREFIX), **bases)
    return LockArtifact(cfg, mapper, vectors, control)
