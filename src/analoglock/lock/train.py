"""Orchestrate one analogy-lock run: harvest pairs, fit, compare with controls, export.

`train(cfg)` only wires objects built from the Hydra config; the math lives in `maps`,
`losses`, `metrics`, the learning in `lock`, the files in `export`. Every run reports the learned
map beside the identity map, the closed-form baselines (mean difference, Procrustes) and the same
training on shuffled pairs, all on the same held-out test pairs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from analoglock.atomic import write_json
from analoglock.bases import FeatureBasis, check_basis_matches, load_basis
from analoglock.hooks import validate_hook
from analoglock.lock.data import PairedDataModule
from analoglock.lock.export import METRICS_FILE, save_relation
from analoglock.lock.losses import relation_preservation
from analoglock.lock.maps import build_mapper
from analoglock.lock.maps.baselines import apply_orthogonal, mean_difference, procrustes
from analoglock.lock.maps.orthogonal import OrthogonalMap
from analoglock.lock.maps.sparse import SparseFeatureMap
from analoglock.lock.metrics import retrieval_topk
from analoglock.lock.module import GROUPS, AnalogyLock, LockCallback, combine_groups
from analoglock.model import model_info
from analoglock.paired import PairedActivations, paired_activations

log = logging.getLogger(__name__)


def make_mapper(
    kind: str,
    d_model: int,
    train: PairedActivations,
    basis: FeatureBasis | None = None,
    **kwargs: Any,
):
    """Build a mapper; orthogonal starts from Procrustes, sparse lives in `basis`'s code space."""
    if kind == "sparse":
        if basis is None:
            raise ValueError(
                "mapper=sparse_matrix learns a feature-to-feature matrix and needs basis=<a basis "
                "directory from analoglock-fit-basis, fit at this hook on this model>."
            )
        return build_mapper(kind, basis_a=basis, **kwargs)
    if basis is not None:
        raise ValueError(
            f"basis= is used only by mapper=sparse_matrix; mapper kind {kind!r} works in the raw "
            "activation space (drop basis= or use mapper=sparse_matrix)."
        )
    if kind == "orthogonal":
        return OrthogonalMap.from_procrustes(train.a, train.b)
    return build_mapper(kind, d_model=d_model, **kwargs)


def load_lock_basis(basis_dir: str | None, model_sha256: str, hook: str) -> FeatureBasis | None:
    """The frozen basis a sparse map works in, checked against the run's model and hook."""
    if not basis_dir:
        return None
    check_basis_matches(basis_dir, model_sha256, hook)
    return load_basis(basis_dir)


@torch.no_grad()
def relation_features(
    mapper: SparseFeatureMap, a: torch.Tensor, k: int = 10, labels: dict | None = None
) -> list[dict[str, Any]]:
    """The features the learned relation moves most: mean code change encode(a) -> encode(a) W + b.

    Weighted by each feature's decoder norm, so the ranking is in activation units.
    """
    codes = mapper.basis_a.encode(a)
    delta = (codes @ mapper.W_feat + mapper.b_feat).mean(0) - codes.mean(0)
    norms = mapper.basis_b.directions.norm(dim=-1) if hasattr(mapper.basis_b, "directions") else 1
    score = delta * norms
    top = score.abs().topk(min(k, len(score))).indices
    return [
        {
            "feature": int(i),
            "code_change": float(delta[i]),
            "activation_change": float(score[i]),
            "label": (labels or {}).get(int(i), {}).get("label"),
        }
        for i in top
    ]


def _basis_labels(basis_dir: str) -> dict:
    """Feature labels written beside the basis by analoglock.bases.labels, or {} when there are none."""
    try:
        from analoglock.bases.labels import read_labels
    except ImportError:
        return {}
    try:
        return read_labels(basis_dir)
    except (FileNotFoundError, ValueError):
        return {}


def heldout_scores(
    mapped: torch.Tensor, b: torch.Tensor, view: list[str], center: torch.Tensor
) -> dict[str, float]:
    """Retrieval and equivariance per view group and row-weighted overall, as the module computes them."""
    per_group: dict[str, tuple[int, dict[str, float]]] = {}
    for g in GROUPS:
        rows = torch.tensor([(v == "story") == (g == "story") for v in view])
        n = int(rows.sum())
        if n < 2:
            continue
        m, bc = mapped[rows] - center, b[rows] - center
        top = retrieval_topk(m, bc, (1, 5))
        per_group[g] = (
            n,
            {
                "top1": float(top["top1"]),
                "top5": float(top["top5"]),
                "equivariance": float(relation_preservation(m, bc)),
            },
        )
    return combine_groups(per_group)


def fit(
    cfg: DictConfig,
    paired: PairedActivations,
    center: torch.Tensor,
    out_dir: Path | None,
    logger,
    shuffle_pairs_seed: int | None = None,
    max_epochs: int | None = None,
    basis: FeatureBasis | None = None,
) -> tuple[AnalogyLock, LockCallback, int, int]:
    """Fit one AnalogyLock (the real run when out_dir is given; a control run otherwise).

    Returns (module, lock callback, epochs run, global rank). A run that already locked is
    restored from its last.ckpt rather than trained further.
    """
    train_part = paired.subset("train")
    mapper = hydra.utils.instantiate(cfg.mapper)(
        d_model=paired.a.shape[1], train=train_part, basis=basis
    )
    module = AnalogyLock(
        mapper,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        weights=OmegaConf.to_container(cfg.loss.weights),
        center=center,
        temperature=cfg.loss.temperature,
        relation_pairs=cfg.loss.relation_pairs,
    )
    dm = PairedDataModule(paired, batch_size=cfg.batch_size, shuffle_pairs_seed=shuffle_pairs_seed)
    lock_cb = LockCallback(**cfg.lock, stop=out_dir is not None)
    callbacks: list = [lock_cb]
    if out_dir is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=out_dir,
                filename="best-{epoch}",
                monitor="val/top1",
                mode="max",
                save_last=True,
            )
        )
    overrides: dict[str, Any] = {
        "callbacks": callbacks,
        "logger": logger if logger is not None else False,
    }
    if out_dir is None:
        overrides.update(
            enable_checkpointing=False, enable_progress_bar=False, max_epochs=max_epochs
        )
    else:
        overrides["default_root_dir"] = str(out_dir)
    trainer = hydra.utils.instantiate(cfg.trainer, **overrides)
    ckpt = out_dir / "last.ckpt" if out_dir is not None else None
    resume = str(ckpt) if ckpt is not None and ckpt.exists() else None
    if resume:
        state = torch.load(resume, weights_only=True, map_location="cpu")  # never unpickle objects
        cb_state = next(
            (v for k, v in state.get("callbacks", {}).items() if k.startswith("LockCallback")), None
        )
        if cb_state is not None and cb_state.get("lock_epoch") is not None:
            log.info(
                "%s already locked at epoch %s; evaluating it without training again",
                resume,
                cb_state["lock_epoch"],
            )
            module.on_load_checkpoint(state)
            module.load_state_dict(state["state_dict"])
            lock_cb.load_state_dict(cb_state)
            return module, lock_cb, int(state["epoch"]) + 1, trainer.global_rank
        log.info("Resuming from %s", resume)
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    return module, lock_cb, trainer.current_epoch, trainer.global_rank


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole lock experiment described by `cfg`; return the metrics written to metrics.json."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = hydra.utils.instantiate(cfg.model)
    validate_hook(model, cfg.hook)
    info = model_info(model).to_dict()
    basis = load_lock_basis(cfg.get("basis"), info["sha256"], cfg.hook)
    paired = paired_activations(
        model, cfg.data.dataset, cfg.hook, tuple(cfg.data.views), progress=True
    )
    del model  # training needs only the activations; the frozen model never enters a checkpoint
    train_part, test_part = paired.subset("train"), paired.subset("test")
    if len(test_part) < 2:
        raise ValueError(f"Need at least 2 test pairs, got {len(test_part)}.")
    center = torch.cat([train_part.a, train_part.b]).mean(0)

    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else None
    if logger is not None and hasattr(logger, "log_hyperparams"):
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    module, lock_cb, epochs_run, rank = fit(cfg, paired, center, out_dir, logger, basis=basis)
    if rank != 0:
        return {}  # under DDP, rank 0 alone evaluates and writes the artifacts

    with torch.no_grad():
        mapped_test = module.mapper(test_part.a)
        learned = heldout_scores(mapped_test, test_part.b, test_part.view, center)
        identity = heldout_scores(test_part.a, test_part.b, test_part.view, center)
        r_md = mean_difference(train_part.a, train_part.b)
        meandiff = heldout_scores(test_part.a + r_md, test_part.b, test_part.view, center)
        R, mu_a, mu_b = procrustes(train_part.a, train_part.b)
        procr = heldout_scores(
            apply_orthogonal(test_part.a, R, mu_a, mu_b), test_part.b, test_part.view, center
        )

    shuffled: dict[str, float] = {}
    shuffled_locked = None
    if cfg.shuffled_control:
        # Same config, same epoch budget, partners deranged: it must not beat the real run or lock.
        ctrl, ctrl_cb, _, _ = fit(
            cfg,
            paired,
            center,
            None,
            None,
            shuffle_pairs_seed=cfg.seed + 1,
            max_epochs=max(1, epochs_run),
            basis=basis,
        )
        shuffled_locked = any(h["locked"] for h in ctrl_cb.history)
        with torch.no_grad():
            shuffled = heldout_scores(ctrl.mapper(test_part.a), test_part.b, test_part.view, center)

    relation = module.mapper.relation_vector(train_part.a).detach()
    save_relation(
        out_dir,
        module.mapper,
        {"relation": relation, "meandiff": r_md, "center": center},
        model=info,
        hook=cfg.hook,
        extra={
            "dataset": cfg.data.dataset,
            "views": list(cfg.data.views),
            "run_name": cfg.run_name,
            # A sparse map is meaningless without its basis: load_relation reloads it from here.
            "basis": str(Path(cfg.basis).resolve()) if basis is not None else None,
        },
    )
    metrics = {
        "locked": lock_cb.locked,
        "lock_epoch": lock_cb.lock_epoch,
        "epochs_run": epochs_run,
        "heldout_top1": learned["top1"],
        "heldout_top5": learned["top5"],
        "equivariance_error": learned["equivariance"],
        "shuffled_control_top1": shuffled.get("top1"),
        "shuffled_control_locked": shuffled_locked,
        "heldout_top1_story": learned.get("top1_story"),
        "shuffled_control_top1_story": shuffled.get("top1_story"),
        "meandiff_top1_story": meandiff.get("top1_story"),
        "procrustes_top1_story": procr.get("top1_story"),
        "identity_top1_story": identity.get("top1_story"),
        "meandiff_top1": meandiff["top1"],
        "procrustes_top1": procr["top1"],
        "identity_top1": identity["top1"],
        "chance_top1": {
            g: 1 / max(1, sum((v == "story") == (g == "story") for v in test_part.view))
            for g in GROUPS
        },
        "n_pairs": {s: len(paired.subset(s)) for s in ("train", "validation", "test")},
        "relation_norm": float(relation.norm()),
        "meandiff_norm": float(r_md.norm()),
        "detail": {
            "learned": learned,
            "identity": identity,
            "meandiff": meandiff,
            "procrustes": procr,
            "shuffled_control": shuffled,
        },
        "history": lock_cb.history,
        "model": info,
        "hook": cfg.hook,
    }
    if isinstance(module.mapper, SparseFeatureMap):
        labels = _basis_labels(cfg.basis)
        metrics["relation_features"] = relation_features(module.mapper, train_part.a, labels=labels)
        if cfg.shuffled_control:
            # The same readout for the shuffled-pairs map: how big a "top feature" is by chance.
            metrics["relation_features_shuffled_control"] = relation_features(
                ctrl.mapper, train_part.a, labels=labels
            )
    write_json(out_dir / METRICS_FILE, metrics)
    from analoglock.reports.lock import lock_report

    figures = lock_report(
        metrics,
        mapped_test - center,
        test_part.b - center,
        test_part.view,
        out_dir,
    )
    if (
        logger is not None
        and hasattr(logger, "experiment")
        and type(logger).__name__ == "WandbLogger"
    ):
        import wandb

        logger.experiment.log({name: wandb.Plotly(fig) for name, fig in figures.items()})
        logger.experiment.summary.update(
            {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}
        )
    log.info(
        "metrics: %s",
        json.dumps({k: v for k, v in metrics.items() if k not in ("history", "detail", "model")}),
    )
    return metrics
