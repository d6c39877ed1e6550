"""The analogy-lock LightningModule and the callback that decides when the map has locked.

Owns the learning: a mapper (from `analoglock.lock.maps`) trained on paired A/B activations with
weighted loss terms (from `analoglock.lock.losses`), held-out lock metrics (from `analoglock.lock.metrics`)
every epoch, and the lock decision. The frozen transformer never enters this module: it trains
on activations harvested beforehand, so checkpoints hold only the map.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from analoglock.lock import losses
from analoglock.lock.metrics import EquivarianceError, LockCriterion, PartnerRetrieval

log = logging.getLogger(__name__)

LOSS_TERMS = ("match", "infonce", "relation", "cka", "rsa", "cycle")
GROUPS = ("story", "roles")  # retrieval groups; batches carry the group index of each row


def combine_groups(per_group: dict[str, tuple[int, dict[str, float]]]) -> dict[str, float]:
    """`<metric>_<group>` for each view group, plus each metric's row-weighted mean over groups."""
    out: dict[str, float] = {}
    total = sum(n for n, _ in per_group.values())
    for g, (_, values) in per_group.items():
        out.update({f"{k}_{g}": v for k, v in values.items()})
    for key in ("top1", "top5", "equivariance"):
        out[key] = sum(n * values[key] for n, values in per_group.values()) / max(total, 1)
    return out


def relative_change(new: torch.Tensor, old: torch.Tensor, eps: float = 1e-12) -> float:
    """||new - old|| / ||old||: how far the map moved this epoch."""
    return float((new - old).norm() / (old.norm() + eps))


class AnalogyLock(L.LightningModule):
    """Learn M: A -> B so that M(a_i) matches its partner b_i and relations within A are preserved.

    `weights` maps loss-term names (match, infonce, relation, cka, rsa, cycle, and the mapper's
    own regularizers such as l1 / nuclear) to weights; 0 disables a term. Similarities are taken
    after subtracting `center` (the mean training activation): the residual stream's large shared
    component would otherwise make every cosine near 1.
    """

    def __init__(
        self,
        mapper: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        weights: dict[str, float],
        center: torch.Tensor | None = None,
        temperature: float = 0.1,
        relation_pairs: int | None = None,
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
        # Candidates for retrieval are rows of the same view (stories compete with stories,
        # role tokens with role tokens): a story vector is trivially unlike a role vector.
        self.groups = list(GROUPS)
        self.val_metrics = torch.nn.ModuleDict(
            {
                g: torch.nn.ModuleDict(
                    {"ret": PartnerRetrieval(k=(1, 5)), "eq": EquivarianceError()}
                )
                for g in self.groups
            }
        )
        self.test_metrics = torch.nn.ModuleDict(
            {
                g: torch.nn.ModuleDict(
                    {"ret": PartnerRetrieval(k=(1, 5)), "eq": EquivarianceError()}
                )
                for g in self.groups
            }
        )
        self.last_val: dict[str, float] = {}

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """M(a)."""
        return self.mapper(a)

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

    def _eval_update(self, batch, metrics: torch.nn.ModuleDict) -> None:
        a, b, group = batch
        m = self.mapper(a) - self.center
        bc = b - self.center
        for gi, g in enumerate(self.groups):
            rows = group == gi
            if int(rows.sum()) >= 2:
                metrics[g]["ret"].update(m[rows], bc[rows])
                metrics[g]["eq"].update(m[rows], bc[rows])

    def _eval_compute(self, metrics: torch.nn.ModuleDict) -> dict[str, float]:
        """Per-view top1/top5/equivariance, and their row-weighted means as the headline."""
        per_group: dict[str, tuple[int, dict[str, float]]] = {}
        for g in self.groups:
            ret, eq = metrics[g]["ret"], metrics[g]["eq"]
            # After a DDP sync the list state arrives concatenated into one tensor.
            rows = ret.mapped_a if isinstance(ret.mapped_a, list) else [ret.mapped_a]
            n = sum(int(x.shape[0]) for x in rows)
            if n >= 2:
                top = ret.compute()
                per_group[g] = (
                    n,
                    {
                        "top1": float(top["top1"]),
                        "top5": float(top["top5"]),
                        "equivariance": float(eq.compute()),
                    },
                )
            ret.reset()
            eq.reset()
        return combine_groups(per_group)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_update(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self._eval_compute(self.val_metrics)
        params = self.mapper.param_vector().detach()
        drift = (
            float("inf")
            if self.prev_params.numel() == 0
            else relative_change(params, self.prev_params)
        )
        if not self.trainer.sanity_checking:
            self.prev_params = params.clone()  # a buffer: survives checkpoint/resume
        self.last_val = {**values, "drift": drift}
        shown = {"top1", "equivariance"}
        self.log_dict({f"val/{k}": v for k, v in self.last_val.items() if k not in shown})
        self.log_dict({f"val/{k}": self.last_val[k] for k in shown}, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_update(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.log_dict({f"test/{k}": v for k, v in self._eval_compute(self.test_metrics).items()})

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
        min_top1: float,
        max_equivariance: float,
        max_drift: float,
        patience: int = 3,
        view: str | None = None,
        stop: bool = True,
    ):
        if view not in (None, *GROUPS):
            raise ValueError(f"lock view must be one of {GROUPS} or null (all rows), not {view!r}")
        self.suffix = f"_{view}" if view else ""  # judge the lock on one view's metrics
        self.criterion = LockCriterion(
            min_top1=min_top1,
            max_equivariance=max_equivariance,
            max_drift=max_drift,
            patience=patience,
        )
        self.stop = stop
        self.history: list[dict[str, float]] = []

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
        top1, eq = (
            v.get("top1" + self.suffix, float("nan")),
            v.get("equivariance" + self.suffix, float("nan")),
        )
        locked = self.criterion.update(top1, eq, v["drift"])
        self.history.append({"epoch": trainer.current_epoch, **v, "locked": float(locked)})
        for (
            logger
        ) in trainer.loggers:  # self.log is not allowed here; write to the loggers directly
            logger.log_metrics({"val/locked": float(locked)}, step=trainer.global_step)
        if locked and self.stop:
            log.info("Locked at epoch %s: %s", self.criterion.lock_epoch, v)
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
