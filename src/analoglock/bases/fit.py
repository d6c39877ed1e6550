"""Fit a feature basis on a stored harvest and measure it: reconstruction on held-out documents,
and the model's next-token loss with the reconstruction spliced in (CE recovered vs zero-ablation)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from analoglock.activations import ActivationStore
from analoglock.atomic import write_json
from analoglock.bases import build_basis
from analoglock.bases.quality import splice_quality
from analoglock.model import model_info

log = logging.getLogger(__name__)


def split_documents(
    n_docs: int, holdout_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks over documents (train, held out): whole documents, never tokens, are held out."""
    perm = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, int(round(n_docs * holdout_fraction))) if n_docs > 1 else 0
    held = torch.zeros(n_docs, dtype=torch.bool)
    held[perm[:n_hold]] = True
    return ~held, held


def cca_fit_and_eval(basis, paired, seed: int = 0, top: int = 10) -> dict[str, Any]:
    """Fit CCA on the train/validation pairs; correlations on held-out test pairs beside shuffled ones.

    In-sample canonical correlations of a few hundred pairs in hundreds of dims are ~1 whatever
    the data: only held-out correlations, next to those of deranged partners, say anything.
    """
    from analoglock.bases.cca import variate_correlations
    from analoglock.stats import derange

    held_rows = [s == "test" for s in paired.split]
    if all(held_rows) or not any(
        held_rows
    ):  # a harvest of one split: hold out whole pairs ourselves
        ids = sorted(set(paired.pair))
        _, held_ids = split_documents(len(ids), 0.2, seed)
        held_set = {i for i, h in zip(ids, held_ids.tolist(), strict=True) if h}
        held_rows = [p in held_set for p in paired.pair]
    held_idx = torch.tensor([i for i, h in enumerate(held_rows) if h])
    fit_idx = torch.tensor([i for i, h in enumerate(held_rows) if not h])
    basis.fit_pair(paired.a[fit_idx], paired.b[fit_idx])
    test_a, test_b = paired.a[held_idx], paired.b[held_idx]
    held = variate_correlations(basis, test_a, test_b)
    perm = derange(len(held_idx), torch.Generator().manual_seed(seed))
    control = variate_correlations(basis, test_a, test_b[perm])
    return {
        "canonical_correlations_in_sample": basis.canonical_correlations.tolist()[:top],
        "heldout/canonical_correlations": held.tolist()[:top],
        "heldout/canonical_correlations_shuffled_control": control.tolist()[:top],
        "heldout/mean_correlation_top": float(held[:top].mean()),
        "heldout/mean_correlation_top_shuffled_control": float(control[:top].mean()),
        "n_pairs": {"fit": len(fit_idx), "heldout": len(held_idx)},
    }


def fit_basis_on_store(
    acts_dir: str | Path,
    kind: str,
    n_features: int,
    out_dir: str | Path,
    hook: str | None = None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    model=None,
    splice_docs: int = 32,
    basis_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit `kind` with `n_features` on a harvest, save it to `out_dir`, and return its metrics."""
    store = ActivationStore(acts_dir)
    hook = hook or store.hooks[0]
    acts = store.load([hook])
    x = acts.acts[hook].float()
    train_docs, held_docs = split_documents(len(acts.docs), holdout_fraction, seed)
    train_rows, held_rows = train_docs[acts.doc], held_docs[acts.doc]
    basis = build_basis(kind, n_components=n_features, hook=hook, **(basis_kwargs or {}))
    if kind == "cca":
        from analoglock.paired import pool_pairs

        metrics: dict[str, Any] = cca_fit_and_eval(basis, pool_pairs(acts, hook), seed)
    elif kind == "sae":  # positions let the SAE trainer drop BOS rows; it reports its run
        basis.fit(x[train_rows], pos=acts.pos[train_rows])
        metrics = {"sae_training": basis.train_stats}
    else:
        basis.fit(x[train_rows])
        metrics = {}
    metrics.update({f"train/{k}": v for k, v in basis.quality(x[train_rows]).items()})
    if held_rows.any():
        metrics.update({f"heldout/{k}": v for k, v in basis.quality(x[held_rows]).items()})
    if model is not None and splice_docs > 0 and kind != "cca":
        if model_info(model).sha256 != store.meta["model"]["sha256"]:
            raise ValueError(
                f"The harvest in {acts_dir} was made on {store.meta['model']['spec']!r}, not on the loaded "
                f"model {model_info(model).spec!r}; spliced loss needs the same model."
            )
        docs = [d for d, h in zip(acts.docs, held_docs.tolist(), strict=True) if h][:splice_docs]
        metrics.update(
            {f"heldout/{k}": v for k, v in splice_quality(model, docs, hook, basis.forward).items()}
        )
    metrics.update({"kind": kind, "hook": hook, "n_features": basis.n_features, "acts": str(acts_dir),
                    "n_rows": {"train": int(train_rows.sum()), "heldout": int(held_rows.sum())}})  # fmt: skip
    out = Path(out_dir)
    basis.save(out, model=store.meta["model"])
    write_json(out / "metrics.json", metrics)
    return metrics
