"""Feature bases fit on frozen activations, registered by `kind` (the string stored in cfg.json).

Every basis is a `FeatureBasis` (see base.py) and satisfies `maps.sparse.FeatureBasisLike`;
this module only names them, builds them and loads them. Comparing bases lives in `matching`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analoglock.bases.base import (
    BASIS_FILE,
    CFG_FILE,
    BasisArtifactError,
    FeatureBasis,
    read_basis_cfg,
)
from analoglock.bases.cca import CCABasis, CCADomain
from analoglock.bases.matching import Match, decomposition_matrix, match_features
from analoglock.bases.nmf import NMFBasis
from analoglock.bases.pca import PCABasis
from analoglock.bases.sae import SAEBasis
from analoglock.bases.svd import SVDBasis
from analoglock.registry import lookup

BASES: dict[str, type[FeatureBasis]] = {
    cls.kind: cls for cls in (SVDBasis, PCABasis, NMFBasis, CCABasis, SAEBasis)
}


def basis_class(kind: str) -> type[FeatureBasis]:
    """The FeatureBasis class registered under `kind`, or a ValueError listing the valid kinds."""
    return lookup(BASES, kind, "basis")


def build_basis(kind: str, **kwargs: Any) -> FeatureBasis:
    """A fresh, unfitted basis of this kind; kwargs are its constructor's (n_components, hook, ...)."""
    return basis_class(kind)(**kwargs)


def load_basis(in_dir: str | Path) -> FeatureBasis:
    """Load a saved basis, picking the class from the "kind" in its cfg.json."""
    cfg = read_basis_cfg(in_dir)
    if "kind" not in cfg:
        raise BasisArtifactError(
            f"{Path(in_dir) / CFG_FILE} has no 'kind'; valid kinds: {', '.join(BASES)}"
        )
    return basis_class(cfg["kind"]).load(in_dir)


def check_basis_matches(
    in_dir: str | Path, model_sha256: str | None = None, hook: str | None = None
) -> dict[str, Any]:
    """Raise BasisArtifactError if the saved basis was fit on another model or hook; return its cfg."""
    cfg = read_basis_cfg(in_dir)
    made = (cfg.get("model") or {}).get("sha256")
    if model_sha256 is not None and made is not None and made != model_sha256:
        spec = (cfg.get("model") or {}).get("spec")
        raise BasisArtifactError(
            f"The basis in {in_dir} was fit on model {spec!r} (sha {made[:12]}), not on the loaded "
            f"model (sha {model_sha256[:12]}); fit a basis on this model's activations."
        )
    if hook is not None and cfg.get("hook") and cfg["hook"] != hook:
        raise BasisArtifactError(
            f"The basis in {in_dir} was fit at hook {cfg['hook']!r}, not {hook!r}; use a basis fit "
            f"at {hook!r} or set hook={cfg['hook']}."
        )
    return cfg


__all__ = [
    "BASES",
    "BASIS_FILE",
    "CFG_FILE",
    "BasisArtifactError",
    "CCABasis",
    "CCADomain",
    "FeatureBasis",
    "Match",
    "NMFBasis",
    "PCABasis",
    "SAEBasis",
    "SVDBasis",
    "basis_class",
    "build_basis",
    "check_basis_matches",
    "decomposition_matrix",
    "load_basis",
    "match_features",
]
