"""Mapping families for the lock trainer, registered by `kind` (the string stored in cfg.json).

Every family is a `Mapper` (see base.py); this module only names them and builds them. Closed-form
baselines (mean difference, Procrustes, least squares) live in `analoglock.lock.maps.baselines`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from analoglock.lock.maps.affine import AffineMap
from analoglock.lock.maps.base import Mapper
from analoglock.lock.maps.lowrank import LowRankMap
from analoglock.lock.maps.orthogonal import OrthogonalMap
from analoglock.lock.maps.sparse import FeatureBasisLike, SparseFeatureMap
from analoglock.lock.maps.translation import TranslationMap
from analoglock.registry import lookup

MAPPERS: dict[str, type[Mapper]] = {
    cls.kind: cls
    for cls in (TranslationMap, AffineMap, LowRankMap, OrthogonalMap, SparseFeatureMap)
}


def mapper_class(kind: str) -> type[Mapper]:
    """The Mapper class registered under `kind`, or a ValueError listing the valid kinds."""
    return lookup(MAPPERS, kind, "mapper")


def build_mapper(kind: str, **kwargs: Any) -> Mapper:
    """A fresh mapper of this kind; kwargs are its constructor's (e.g. d_model, rank, basis_a)."""
    return mapper_class(kind)(**kwargs)


def mapper_from_tensors(
    kind: str, cfg: dict[str, Any], tensors: dict[str, Tensor], **extra: Any
) -> Mapper:
    """Load an exported mapper; `extra` carries non-tensor parts (basis_a= for "sparse")."""
    return mapper_class(kind).from_tensors(cfg, tensors, **extra)


__all__ = [
    "MAPPERS",
    "AffineMap",
    "FeatureBasisLike",
    "LowRankMap",
    "Mapper",
    "OrthogonalMap",
    "SparseFeatureMap",
    "TranslationMap",
    "build_mapper",
    "mapper_class",
    "mapper_from_tensors",
]
