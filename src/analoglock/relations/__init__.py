"""Relations between concepts: vector algebra, separability, hierarchy, relations of relations,
interpolation, singular-direction derivatives, search by shape, anomalies, and relations as
operators (linear relational embeddings on the Hernandez et al. benchmark).

Every analysis is a runner `run(cfg_section, ctx: RelationsContext) -> dict` registered in
`ANALYSES` by name, with its settings in a dataclass of `config.CONFIGS` (registered in Hydra's
ConfigStore); the CLI (`analoglock-relations analyses=[...]`) calls them in order and writes
their results to relations.json, and `analoglock.reports.relations` draws them. Runners are
imported on first call, so importing the package stays cheap and one analysis's heavy
dependencies do not load for another.

Modules by job: context (what a runner receives), concepts (harvesting concept rows, edited
forward passes), vectors (concept vectors and probes), text (content words, paraphrases, token
ids), common (the default SVD basis, text activations), paths and derivatives (the machinery of
interpolate and jacobian), shape_spec (the search-by-shape spec), lre_data / lre_model / lre_ops
(the benchmark's files, forward passes and operators behind lre), and one module per analysis.
Shared statistics (random directions, empirical p, BH) live in `analoglock.stats`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from analoglock.relations.config import CONFIGS
from analoglock.relations.context import ConceptActs, RelationsContext

Runner = Callable[[Any, RelationsContext], dict]

# name -> (module under analoglock.relations, runner function)
_RUNNERS: dict[str, tuple[str, str]] = {
    "algebra": ("algebra", "run"),
    "separability": ("separability", "run"),
    "hierarchy": ("hierarchy", "run"),
    "recursive": ("recursive", "run"),
    "interpolate": ("interpolate", "run"),
    "jacobian": ("jacobian", "run"),
    "shape": ("shape", "run"),
    "anomalies": ("anomalies", "run"),
    "lre": ("lre", "run"),
}


def _lazy(module: str, attr: str) -> Runner:
    """A runner that imports `analoglock.relations.<module>` when first called."""

    def runner(cfg: Any, ctx: RelationsContext) -> dict:
        return getattr(importlib.import_module(f"analoglock.relations.{module}"), attr)(cfg, ctx)

    runner.__name__ = f"{module}.{attr}"
    runner.__doc__ = f"Run analoglock.relations.{module}.{attr}(cfg, ctx)."
    return runner


ANALYSES: dict[str, Runner] = {name: _lazy(*where) for name, where in _RUNNERS.items()}

__all__ = ["ANALYSES", "CONFIGS", "ConceptActs", "RelationsContext"]
