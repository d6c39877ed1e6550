"""Orchestrate one analogy-lock run: pairs -> fit -> control fit -> evaluate -> export.

`train(cfg)` only wires objects built from the Hydra config and returns `(metrics, objects)`;
the math lives in `maps`, `losses`, `evaluate`, the learning in `module`, the files in `export`.
Reports and plots are drawn by `analoglock.reports.lock` from what this returns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from analoglock.atomic import write_json
from analoglock.bases import FeatureBasis, check_basis_matches, load_basis
from analoglock.hooks import validate_hook
from analoglock.lock.data import PairedDataModule
from analoglock.lock.evaluate import (
    baseline_maps,
    evaluate_maps,
    margins,
    relation_features,
    summarize,
)
from analoglock.lock.export import METRICS_FILE, save_artifact
from analoglock.lock.module import AnalogyLock, LockCallback
from analoglock.model import model_info
from analoglock.paired import PairedActivations, paired_activations

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.json"
# Settings that may change between a run and its resume without changing what is learned.
_RESUMABLE_KEYS = ("out_dir", "trainer", "logger", "run_name")


def load_lock_basis(basis_dir: str | None, model_sha256: str, hook: str) -> FeatureBasis | None:
    """The frozen basis a sparse map works in, checked against the run's model and hook."""
    if not basis_dir:
        return None
    check_basis_matches(basis_dir, model_sha256, hook)
    return load_basis(basis_dir)


def basis_labels(basis_dir: str) -> dict:
    """Feature labels written beside the basis by analoglock.bases.labels, or {} when there are none."""
    from analoglock.bases.labels import read_labels

    try:
        return read_labels(basis_dir)
    except (FileNotFoundError, ValueError):
        return {}


def check_resume(cfg: DictConfig, out_dir: Path) -> None:
    """Refuse to resume a run folder made with another configuration (name the differences)."""
    mine = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in _RESUMABLE_KEYS}  # fmt: skip
    path = out_dir / RUN_CONFIG_FILE
    if (out_dir / "last.ckpt").exists() and path.exists():
        theirs = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(
                f"{out_dir} holds a run made with another configuration (differs in: "
                f"{', '.join(diff)}); resuming it would mix two experiments. Start fresh with "
                f"out_dir=<a new folder> (or delete {out_dir})."
            )
    write_json(path, mine)


def build_module(cfg: DictConfig, train: PairedActivations, center: torch.Tensor, basis):
    """The LightningModule with a fresh mapper built from cfg.mapper."""
    mapper = hydra.utils.instantiate(cfg.mapper)(
        d_model=train.a.shape[1], train_a=train.a, train_b=train.b, basis=basis
    )
    return AnalogyLock(
        mapper,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        weights=OmegaConf.to_container(cfg.loss.weights),
        center=center,
        temperature=cfg.loss.temperature,
        relation_pairs=cfg.loss.relation_pairs,
        ridge=cfg.loss.get("ridge", 1.0),
    )


def fit(
    cfg: DictConfig,
    paired: PairedActivations,
    center: torch.Tensor,
    out_dir: Path | None,
    logger,
    basis=None,
    shuffle_pairs_seed: int | None = None,
    max_epochs: int | None = None,
) -> tuple[AnalogyLock, LockCallback, int]:
    """Fit one AnalogyLock: the real run when out_dir is given, the shuffled control otherwise.

    Returns (module, lock callback, epochs run). A run that already locked is restored from its
    last.ckpt rather than trained further. Every DDP rank runs every fit (a fit run on one rank
    alone would hang the others in their collectives).
    """
    module = build_module(cfg, paired.subset("train"), center, basis)
    dm = PairedDataModule(
        paired, batch_size=cfg.batch_size, shuffle_pairs_seed=shuffle_pairs_seed, seed=cfg.seed
    )
    callbacks = {k: hydra.utils.instantiate(v) for k, v in cfg.callbacks.items()}
    lock_cb = callbacks["lock"]
    overrides: dict[str, Any] = {"logger": logger if logger is not None else False}
    if out_dir is None:
        lock_cb.stop = False  # the control runs its whole epoch budget: it must never lock
        callbacks = {"lock": lock_cb}
        overrides.update(
            enable_checkpointing=False, enable_progress_bar=False, max_epochs=max_epochs
        )
    else:
        overrides["default_root_dir"] = str(out_dir)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=list(callbacks.values()), **overrides)
    ckpt = out_dir / "last.ckpt" if out_dir is not None else None
    resume = str(ckpt) if ckpt is not None and ckpt.exists() else None
    if resume:
        try:  # never unpickle objects: a checkpoint is data, and may not be ours
            state = torch.load(resume, weights_only=True, map_location="cpu")
        except Exception as err:
            raise ValueError(
                f"{resume} is not a checkpoint analoglock can trust (it is corrupt, or holds "
                f"pickled objects that are never loaded): {type(err).__name__}. Do not load it "
                "with weights_only=False; delete it to start this run fresh."
            ) from err
        cb_state = next(
            (v for k, v in state.get("callbacks", {}).items() if k.startswith("LockCallback")), None
        )
        if cb_state is not None and cb_state.get("lock_epoch") is not None:
            log.info(
                "%s already locked at epoch %s; not training again", resume, cb_state["lock_epoch"]
            )
            module.on_load_checkpoint(state)
            module.load_state_dict(state["state_dict"])
            lock_cb.load_state_dict(cb_state)
            return module, lock_cb, int(state["epoch"]) + 1
        log.info("Resuming from %s", resume)
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    best = getattr(callbacks.get("model_checkpoint"), "best_model_path", "")
    if best and not lock_cb.locked:
        # No lock: keep the epoch that was best on validation, not the last (maps overfit).
        state = torch.load(best, weights_only=True, map_location="cpu")
        module.load_state_dict(state["state_dict"])
        log.info("Not locked; keeping the best validation epoch's map (%s)", best)
    return module, lock_cb, trainer.current_epoch


def test_report(
    module: AnalogyLock, control: AnalogyLock | None, paired: PairedActivations, center, ridge
) -> dict[str, Any]:
    """Every map on the same held-out test pairs, item by item, and paired margins."""
    train_part, test_part = paired.subset("train"), paired.subset("test")
    maps = {"learned": module.mapper, **baseline_maps(train_part, ridge=ridge)}
    if control is not None:
        maps["shuffled_control"] = control.mapper
    with torch.no_grad():
        items = evaluate_maps(maps, test_part, center)
    learned = items.pop("learned")
    return {
        "summary": {"learned": summarize(learned), **{k: summarize(v) for k, v in items.items()}},
        "margins": margins(learned, items, groups=("story", "roles", "mentions", "assign")),
        "items": {"learned": learned, **items},
    }


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the lock experiment described by `cfg`; return (metrics, objects).

    metrics is what metrics.json holds (rank 0; {} on other DDP ranks); objects holds the
    module, the control module, the paired activations and the per-item test scores.
    """
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir={out_dir} is a file; give a folder for the run.")
    model = hydra.utils.instantiate(cfg.model)
    validate_hook(model, cfg.hook)  # before anything is written
    info = model_info(model).to_dict()
    basis = load_lock_basis(cfg.get("basis"), info["sha256"], cfg.hook)
    paired = paired_activations(model, cfg.data.name, cfg.hook, tuple(cfg.views), progress=True)
    del model  # training needs only the activations; the frozen model never enters a checkpoint
    out_dir.mkdir(parents=True, exist_ok=True)
    check_resume(cfg, out_dir)
    train_part, test_part = paired.subset("train"), paired.subset("test")
    if len(test_part) < 2:
        raise ValueError(f"Need at least 2 test pairs, got {len(test_part)}.")
    center = torch.cat([train_part.a, train_part.b]).mean(0)

    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else None
    if logger is not None and hasattr(logger, "log_hyperparams"):
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    module, lock_cb, epochs_run = fit(cfg, paired, center, out_dir, logger, basis)
    control = ctrl_cb = None
    if cfg.shuffled_control:
        # Same config and epoch budget, partners deranged within each view: must never lock.
        control, ctrl_cb, _ = fit(
            cfg, paired, center, None, None, basis,
            shuffle_pairs_seed=cfg.seed + 1, max_epochs=max(1, epochs_run),
        )  # fmt: skip
    if getattr(module, "global_rank", 0) != 0:
        return {}, {}  # under DDP, rank 0 alone evaluates and writes the artifacts

    report = test_report(module, control, paired, center, cfg.loss.get("ridge", 1.0))
    with torch.no_grad():
        learned_vec = module.mapper.relation_vector(train_part.a).detach()
    a_c = train_part.subset(view="story").a
    a_c = a_c - a_c.mean(0)
    save_artifact(
        out_dir,
        module.mapper,
        {
            "learned": learned_vec,
            "meandiff": train_part.subset(view="story").b.mean(0)
            - train_part.subset(view="story").a.mean(0),
            "center": center,
            "cov_a": a_c.T @ a_c / max(1, len(a_c) - 1),
        },
        model=info,
        hook=cfg.hook,
        control_mapper=control.mapper if control is not None else None,
        extra={
            "dataset": cfg.data.name,
            "views": list(cfg.views),
            "run_name": cfg.run_name,
            "seed": int(cfg.seed),
            # A sparse map is meaningless without its basis: load_artifact reloads it from here.
            "basis": str(Path(cfg.basis).resolve()) if basis is not None else None,
        },
    )
    clauses = lock_cb.history[-1]["clauses"] if lock_cb.history else {}
    metrics = {
        "locked": lock_cb.locked,
        "lock_epoch": lock_cb.lock_epoch,
        "epochs_run": epochs_run,
        "not_applicable": [k for k, v in clauses.items() if v is None],
        "shuffled_control_locked": ctrl_cb.locked if ctrl_cb is not None else None,
        "test": report["summary"],
        "test_margins": report["margins"],
        "n_pairs": {s: len(paired.subset(s)) for s in ("train", "validation", "test")},
        "learned_norm": float(learned_vec.norm()),
        "history": lock_cb.history,
        "model": info,
        "hook": cfg.hook,
        "mapper": module.mapper.kind,
        "seed": int(cfg.seed),
    }
    if getattr(module.mapper, "kind", "") == "sparse":
        labels = basis_labels(cfg.basis)
        metrics["relation_features"] = relation_features(module.mapper, train_part.a, labels=labels)
        if control is not None:  # how big a "top feature" is when the pairs are wrong
            metrics["relation_features_shuffled_control"] = relation_features(
                control.mapper, train_part.a, labels=labels
            )
    write_json(out_dir / METRICS_FILE, metrics)
    objects = {"module": module, "control": control, "paired": paired, "items": report["items"]}
    return metrics, objects
