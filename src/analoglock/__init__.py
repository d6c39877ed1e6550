"""analoglock: find how a frozen transformer relates its own features, and lock analogies.

The working API, for a notebook (imported on first use, so `import analoglock` stays light):

    import analoglock as al
    model = al.load_model("smollm2")                         # or "gemma3", an HF dir, a .gguf
    docs = al.load_documents("fable_work", split="train")    # shipped data (FORMAT.md)
    acts = al.harvest(model, docs, ["blocks.20.hook_resid_post"])
    basis = al.build_basis("pca", n_components=64, hook="blocks.20.hook_resid_post").fit(x)
    pairs = al.paired_activations(model, "fable_work", "blocks.20.hook_resid_post")
    metrics, objects = al.train_lock(cfg)                    # cfg: the `train` Hydra config
    lock = al.load_artifact("checkpoints/fable_to_work", model)
    report = al.run_steering(model, lock)                    # the lock beside its controls

Packages, one concern each, imports one way (data -> model -> activations -> bases -> {lock,
patching} -> relations -> reports -> cli; `make test` enforces it): `data` (shipped datasets),
`model` / `hooks` / `tokens` / `generation`, `activations`, `activation_store` and `paired`
(harvests, their files, A/B pairs), `bases` (SAE, PCA, SVD, NMF, CCA, labels), `lock` (the
analogy lock: maps, losses, criterion, training, export, steering), `patching`
(feature-to-feature causation), `relations` (concept relations), `reports` (HTML), `cli` (thin
Hydra entry points), `vectors` (llama.cpp control vectors).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "analoglock.model",
    "model_info": "analoglock.model",
    "load_documents": "analoglock.data",
    "load_pairs": "analoglock.data",
    "harvest": "analoglock.activations",
    "harvest_to_disk": "analoglock.activations",
    "ActivationStore": "analoglock.activation_store",
    "generate": "analoglock.generation",
    "paired_activations": "analoglock.paired",
    "build_basis": "analoglock.bases",
    "load_basis": "analoglock.bases",
    "train_lock": ("analoglock.lock.train", "train"),
    "load_artifact": "analoglock.lock.export",
    "map_steering": "analoglock.lock.steering.hooks",
    "combined_steering": "analoglock.lock.steering.hooks",
    "vector_steering": "analoglock.lock.steering.hooks",
    "run_steering": "analoglock.lock.steering.evaluate",
    "exact_effects": "analoglock.patching.exact",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """Import an API name's module on first use."""
    if name not in _API:
        raise AttributeError(f"module 'analoglock' has no attribute {name!r}")
    where = _API[name]
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
