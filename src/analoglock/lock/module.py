"""The analogy-lock LightningModule and the callback that decides when the map has locked.

Owns the learning: a mapper (from `analoglock.lock.maps`) trained on paired A/B activations with
weighted loss terms (from `analoglock.lock.losses`); every validation epoch it scores the map item
by item on the whole validation set beside the closed-form baselines (`analoglock.lock.evaluate`)
and hands the paired, bootstrapped evidence to the lock callback. The frozen transformer never
enters this module: it trains on activations harvested beforehand, so checkpoints hold only the
map (validation rows are non-persistent buffers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from analoglock.lock import losses
from analoglock.lock.evaluate import (
    BASELINES,
    baseline_maps,
    evaluate_maps,
    margins,
    score_items,
    summarize,
)
from analoglock.lock.metrics import LockCriterion
from analoglock.paired import PairedActivations

log = logging.getLogger(__name__)

LOSS_TERMS = ("match", "infonce", "relation", "cka", "rsa", "cycle")


def relative_change(new: torch.Tensor, old: torch.Tensor, eps: float = 1e-12) -> float:
    """||new - old|| / ||old||: how far the map moved this epoch."""
    return float((new - old).norm() / (old.norm() + eps))


class AnalogyLock(L.LightningModule):
    """Learn M: A -> B so that M(a_i) matches its partner b_i and relations within A are preserved.

    `weights` maps loss-term names (match, infonce, relation, cka, rsa, cycle, and the mapper's
    own regularizers such as l1 / fro / nuclear) to weights; 0 disables a term. Similarities are
    taken after subtracting `center` (the mean training activation): the residual stream's large
    shared component would otherwise make every cosine near 1.

    Validation does not go through the dataloader's rows: `setup` takes the whole validation
    split from the datamodule, and every rank scores all of it, so under DDP every rank sees the
    same metrics and makes the same lock decision without a gather.
    """

    def __init__(
        self,
        mapper: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        weights: dict[str, float],
        center: torch.Tensor | None = None,
        temperature: float = 0.1,
        relation_pairs: int | None = None,
        ridge: float = 1.0,
    ):
        super().__init__()
        # The mapper is a module: Lightning stores its weights in the state dict, its kind and
        # config in hparams (so a checkpoint says what to rebuild), never the module itself.
        self.save_hyperparameters(ignore=["mapper", "optimizer", "center"])
        self.hparams["mapper_kind"] = mapper.kind
        self.hparams["mapper_cfg"] = mapper.config()
        self.mapper = mapper
        self.optimizer_factory = optimizer
        self.weights = {k: float(v) for k, v in weights.items()}
        d = (
            next(iter(mapper.export_tensors().values())).shape[-1]
            if center is None
            else center.shape[-1]
        )
        self.register_buffer("center", center.clone() if center is not None else torch.zeros(d))
        self.register_buffer("prev_params", torch.zeros(0))
        self.temperature = temperature
        self.relation_pairs = relation_pairs
        self.ridge = ridge
        self.val_part: PairedActivations | None = None
        self.val_baselines: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self.last_val: dict[str, Any] = {}

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """M(a)."""
        return self.mapper(a)

    def setup(self, stage: str) -> None:
        """Take the validation split and score the closed-form baselines on it once."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        paired = getattr(dm, "paired", None)
        if paired is None:
            return
        self.val_part = paired.subset("validation")
        maps = baseline_maps(paired.subset("train"), ridge=self.ridge)
        self.val_baselines = evaluate_maps(maps, self.val_part, self.center.cpu())

    def loss_terms(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every enabled loss term on one batch of pairs."""
        mapped = self.mapper(a)
        m, bc = mapped - self.center, b - self.center
        on = {k for k, w in self.weights.items() if w != 0}
        terms: dict[str, torch.Tensor] = {}
        if "match" in on:
            terms["match"] = losses.cosine_matching(m, bc)
        if "infonce" in on:
            terms["infonce"] = losses.info_nce(m, bc, self.temperature)
        if "relation" in on:
            terms["relation"] = losses.relation_preservation(m, bc, self.relation_pairs)
        if "cka" in on:
            terms["cka"] = losses.cka_loss(m, bc)
        if "rsa" in on:
            terms["rsa"] = losses.rsa_loss(m, bc)
        if "cycle" in on:
            terms["cycle"] = losses.cycle_consistency(a, self.mapper.inverse(mapped))
        for name, value in self.mapper.regularizers().items():
            if name in on:
                terms[name] = value
        missing = on - set(terms)
        if missing:
            raise ValueError(
                f"Loss weights name terms that do not exist for a {self.mapper.kind} map: {sorted(missing)}; "
                f"valid: {sorted(set(LOSS_TERMS) | set(self.mapper.regularizers()))}"
            )
        return terms

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        a, b, _ = batch
        terms = self.loss_terms(a, b)
        total, logged = losses.total_loss(terms, {k: self.weights[k] for k in terms})
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"Non-finite loss at epoch {self.current_epoch}, batch {batch_idx}: {logged}"
            )
        self.log_dict(
            {f"train/{k}": v for k, v in logged.items()}, prog_bar=False, batch_size=a.shape[0]
        )
        self.log("train/loss", total, prog_bar=True, batch_size=a.shape[0])
        return total

    def validation_step(self, batch, batch_idx: int) -> None:
        """Nothing per batch: the whole validation split is scored at epoch end."""

    def evaluate_validation(self) -> dict[str, Any]:
        """Per-group means and paired margins vs every baseline on the whole validation split."""
        if self.val_part is None:
            raise RuntimeError("AnalogyLock.setup() found no datamodule with paired activations.")
        with torch.no_grad():
            p = next(self.mapper.parameters())
            mapped = self.mapper(self.val_part.a.to(p.device, p.dtype)).cpu().float()
        learned = score_items(mapped, self.val_part, self.center.cpu())
        groups = ("story", "roles", "assign")
        return {**summarize(learned), "margins": margins(learned, self.val_baselines, groups)}

    def on_validation_epoch_end(self) -> None:
        values = self.evaluate_validation()
        params = self.mapper.param_vector().detach()
        drift = (
            float("inf")
            if self.prev_params.numel() == 0
            else relative_change(params, self.prev_params)
        )
        if not self.trainer.sanity_checking:
            self.prev_params = params.clone()  # a buffer: survives checkpoint/resume
        self.last_val = {**values, "drift": drift}
        flat = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        flat.update({f"margin/{k}_lo": v[1] for k, v in values["margins"].items()})
        flat["drift"] = drift
        shown = {"top1_story", "top1_roles"}
        self.log_dict({f"val/{k}": float(v) for k, v in flat.items() if k not in shown})
        self.log_dict({f"val/{k}": float(flat[k]) for k in shown if k in flat}, prog_bar=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # prev_params starts empty and grows after the first epoch; size it before loading.
        saved = checkpoint["state_dict"].get("prev_params")
        if saved is not None:
            self.prev_params = torch.zeros_like(saved)

    def configure_optimizers(self):
        return self.optimizer_factory(self.mapper.parameters())


class LockCallback(Callback):
    """After each validation, ask the lock criterion; stop training once the map has locked.

    The criterion's state (streak, lock epoch) and the per-epoch history are part of the
    checkpoint, so a resumed run keeps counting where it left off.
    """

    def __init__(
        self,
        views: tuple[str, ...] | list[str] = ("story", "roles"),
        baselines: tuple[str, ...] | list[str] = ("identity", "meandiff", "procrustes"),
        min_margin: float = 0.0,
        relation_test: bool = True,
        max_drift: float = 0.02,
        patience: int = 3,
        stop: bool = True,
    ):
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"Unknown lock baselines {unknown}; valid: {', '.join(BASELINES)}")
        bad_views = [v for v in views if v not in ("story", "roles", "mentions")]
        if bad_views:
            raise ValueError(f"lock views must be story, roles or mentions, not {bad_views}")
        self.criterion = LockCriterion(
            views=tuple(views),
            baselines=tuple(baselines),
            min_margin=min_margin,
            relation_test=relation_test,
            max_drift=max_drift,
            patience=patience,
        )
        self.stop = stop
        self.history: list[dict[str, Any]] = []

    @property
    def locked(self) -> bool:
        return bool(self.criterion.locked)

    @property
    def lock_epoch(self) -> int | None:
        return self.criterion.lock_epoch

    def on_validation_end(self, trainer: L.Trainer, pl_module: AnalogyLock) -> None:
        if trainer.sanity_checking or not pl_module.last_val:
            return
        v = pl_module.last_val
        applies = bool(getattr(pl_module.mapper, "changes_relations", True))
        clauses = self.criterion.clauses(v["margins"], v["drift"], applies)
        locked = self.criterion.update(v["margins"], v["drift"], applies)
        drift = v["drift"] if v["drift"] != float("inf") else None  # first epoch: no drift yet
        self.history.append(
            {
                "epoch": trainer.current_epoch,
                **v,
                "drift": drift,
                "clauses": clauses,
                "locked": locked,
            }
        )
        for logger in trainer.loggers:  # self.log is not allowed here; write to the loggers
            logger.log_metrics({"val/locked": float(locked)}, step=trainer.global_step)
        if locked and self.stop:
            log.info("Locked at epoch %s", self.criterion.lock_epoch)
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        c = self.criterion
        return {
            "epoch": c.epoch,
            "streak": c.streak,
            "lock_epoch": c.lock_epoch,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = self.criterion
        c.epoch, c.streak, c.lock_epoch = state["epoch"], state["streak"], state["lock_epoch"]
        self.history = list(state["history"])
