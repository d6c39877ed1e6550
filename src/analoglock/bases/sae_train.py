"""Training a SAELens sparse autoencoder on harvested activation rows, as a LightningModule.

Owns: the training settings (`SAETrainConfig`), rows in (a tensor or an `ActivationStore`,
BOS rows dropped, NaNs refused), the activation scale (SAELens's `ActivationScaler`: mean row
norm -> sqrt(d_model)), the Lightning loop around SAELens's `TrainingSAE.training_forward_pass`
(SAELens computes every loss, TopK's auxiliary loss on dead latents included), the dead-latent
counter SAELens's `SAETrainer` keeps, checkpoints (`last.ckpt`, resumed when present), logging
(wandb offline / CSV), tokens/s, and the export to a SAELens inference SAE with the scale folded
into its weights (so it runs on raw activations). Knows nothing of `FeatureBasis`: `bases.sae`
wraps what this returns.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from sae_lens import SAE, TrainingSAE
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAEConfig, TrainStepInput
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.optim import CoefficientScheduler, get_lr_scheduler
from torch import Tensor

from analoglock.activation_store import ActivationStore
from analoglock.registry import lookup

log = logging.getLogger(__name__)

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "standard")  # SAELens training classes we wrap
LAST_CKPT = "last.ckpt"
BOS_NORM_RATIO = 10.0  # a row this many times the median norm looks like a BOS attention sink


@dataclass
class SAETrainConfig:
    """How to train (not what the SAE is: SAELens's own config fields, like k, go in `sae`)."""

    architecture: str = "topk"  # topk | batchtopk | jumprelu | standard (SAELens classes)
    n_tokens: int = 1_000_000  # token presentations in all (steps = n_tokens // batch_size)
    batch_size: int = 4096
    lr: float = 3e-4  # SAELens's default
    lr_scheduler: str = "constant"  # SAELens get_lr_scheduler: constant | cosineannealing | ...
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    lr_end: float | None = None  # None: lr / 10, as SAELens
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # SAETrainer clips the gradient norm at 1.0
    dead_feature_window: int = 200  # steps without firing before a latent counts as dead (aux loss)
    normalize: bool = True  # scale rows so their mean norm is sqrt(d_model) during training
    init_b_dec_to_mean: bool = True  # start the decoder bias at the (scaled) data mean
    exclude_bos: bool = True  # drop position-0 rows when positions are known
    seed: int = 0
    ckpt_dir: str | None = None  # last.ckpt + logs go here; None: no checkpoint, no logger
    ckpt_every_n_steps: int = 100
    logger: str = "csv"  # csv | wandb (offline unless a key exists) | none
    progress: bool = True
    accelerator: str = "auto"
    sae: dict[str, Any] = field(default_factory=dict)  # SAELens training-config fields (k, ...)

    def __post_init__(self) -> None:
        lookup(dict.fromkeys(ARCHITECTURES), self.architecture, "SAE architecture")
        for name in ("n_tokens", "batch_size", "dead_feature_window", "ckpt_every_n_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.logger not in ("csv", "wandb", "none"):
            raise ValueError(f"logger must be csv, wandb or none, got {self.logger!r}")
        valid = sae_option_names(self.architecture)
        unknown = sorted(set(self.sae) - valid)
        if unknown:
            raise ValueError(
                f"{unknown} are not fields of SAELens's {self.architecture!r} training config; "
                f"valid: {', '.join(sorted(valid))}"
            )

    @property
    def total_steps(self) -> int:
        """Optimizer steps for n_tokens presentations (at least one)."""
        return max(1, self.n_tokens // self.batch_size)

    @classmethod
    def from_options(cls, architecture: str, **options: Any) -> SAETrainConfig:
        """Split flat options (as Hydra gives them) into training fields and SAELens fields."""
        ours = {f.name for f in fields(cls)} - {"sae", "architecture"}
        lookup(dict.fromkeys(ARCHITECTURES), architecture, "SAE architecture")
        theirs = sae_option_names(architecture)
        train = {k: v for k, v in options.items() if k in ours}
        sae = {k: v for k, v in options.items() if k in theirs and k not in ours}
        unknown = sorted(set(options) - set(train) - set(sae))
        if unknown:
            raise ValueError(
                f"Unknown SAE options {unknown}. Training options: {', '.join(sorted(ours))}; "
                f"SAELens {architecture!r} options: {', '.join(sorted(theirs))}"
            )
        return cls(architecture=architecture, sae=sae, **train)


def sae_option_names(architecture: str) -> set[str]:
    """Fields of SAELens's training config for `architecture` that a user may set."""
    cfg_cls = get_sae_training_class(architecture)[1]
    return {f.name for f in fields(cfg_cls)} - {"d_in", "d_sae", "metadata", "device"}


def training_sae_config(
    architecture: str, d_in: int, d_sae: int, options: dict[str, Any], normalize: bool
) -> TrainingSAEConfig:
    """SAELens's training config; normalisation is SAELens's "expected_average_only_in"."""
    cfg_cls = get_sae_training_class(architecture)[1]
    norm = "expected_average_only_in" if normalize else "none"
    return cfg_cls(d_in=d_in, d_sae=d_sae, **{"normalize_activations": norm, **options})


# --- rows in ---------------------------------------------------------------------------------


def check_rows(x: Tensor, n_features: int, batch_size: int, k: float | None = None) -> Tensor:
    """Refuse what cannot train a `n_features`-wide SAE: NaN/inf, too few rows, k out of range."""
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"activations must be [n, d_model] with n >= 1, got {tuple(x.shape)}")
    bad = ~torch.isfinite(x).all(dim=-1)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise ValueError(
            f"{int(bad.sum())} of {len(x)} activation rows hold NaN or inf (first: row {first}); "
            "the harvest is broken (check the model dtype) or the rows need filtering"
        )
    if len(x) < n_features:
        raise ValueError(
            f"{len(x)} rows cannot train {n_features} latents: each latent needs rows to learn "
            f"from; give at least {n_features} rows (harvest more text) or lower n_features"
        )
    if len(x) < batch_size:
        raise ValueError(
            f"{len(x)} rows are fewer than one batch of {batch_size}; lower batch_size "
            "(sae.batch_size=...) or harvest more"
        )
    if k is not None and not 0 < k < n_features:
        raise ValueError(f"k must be in (0, n_features={n_features}), got {k}")
    return x


def drop_bos(x: Tensor, pos: Tensor | None, exclude_bos: bool) -> Tensor:
    """Rows without position 0 (SmolLM2's BOS has a huge norm); warns on BOS-like rows otherwise."""
    if pos is not None:
        if len(pos) != len(x):
            raise ValueError(f"pos has {len(pos)} entries for {len(x)} rows")
        if exclude_bos and bool((pos == 0).any()):
            log.info("Dropping %d BOS (position 0) rows from SAE training", int((pos == 0).sum()))
            return x[pos != 0]
        return x
    norms = x.norm(dim=-1)
    outliers = int((norms > BOS_NORM_RATIO * norms.median()).sum())
    if outliers:
        log.warning(
            "%d rows have norm > %gx the median (BOS-like); pass pos= to drop position 0",
            outliers,
            BOS_NORM_RATIO,
        )
    return x


def rows_from_store(
    store: ActivationStore | str | Path,
    hook: str,
    exclude_bos: bool = True,
    doc_mask: Tensor | None = None,
) -> Tensor:
    """All rows of `hook` in a harvest, shard by shard, minus BOS rows and unselected documents."""
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    parts = []
    for shard in store.iter_shards([hook]):
        keep = torch.ones(len(shard["pos"]), dtype=torch.bool)
        if exclude_bos:
            keep &= shard["pos"] != 0
        if doc_mask is not None:
            keep &= doc_mask[shard["doc"]]
        parts.append(shard[hook][keep].float())
    if not parts:
        raise ValueError(f"{store.path} holds no rows for {hook}")
    return torch.cat(parts)


class RowBatches:
    """Shuffled full batches of rows; epoch e is permuted by seed + e, so it is reproducible.

    Stateful (state_dict / load_state_dict), so Lightning resumes a checkpoint taken mid-epoch at
    the next unseen batch: a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, x: Annotated[Tensor, "n d"], batch_size: int, seed: int = 0):
        self.x, self.batch_size, self.seed = x, int(batch_size), int(seed)
        self.epoch, self.done, self._skip = 0, 0, 0

    def __len__(self) -> int:
        return len(self.x) // self.batch_size  # full batches only: every step sees batch_size rows

    def __iter__(self) -> Iterator[Tensor]:
        perm = torch.randperm(
            len(self.x), generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        start, self._skip = self._skip, 0
        for b in range(start, len(self)):
            self.done = b + 1
            yield self.x[perm[b * self.batch_size : (b + 1) * self.batch_size]]
        self.epoch, self.done = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "done": self.done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip = int(state["epoch"]), int(state["done"])


def scaling_factor(x: Tensor, batch_size: int, seed: int) -> float:
    """SAELens's ActivationScaler estimate (sqrt(d_in) / mean norm) over one pass of the rows."""
    rows = RowBatches(x, batch_size, seed)
    scaler = ActivationScaler()
    scaler.estimate_scaling_factor(x.shape[1], iter(rows), len(rows))
    return float(scaler.scaling_factor)


# --- the LightningModule ---------------------------------------------------------------------


class SAETrainingModule(L.LightningModule):
    """A SAELens TrainingSAE trained by Lightning; every loss is SAELens's training_forward_pass.

    Rows arrive raw and are multiplied by `act_scale` (SAELens's ActivationScaler) first;
    `steps_since_fired` is SAETrainer's dead-latent counter, so TopK's aux loss sees the same mask.
    """

    def __init__(
        self,
        architecture: str,
        d_in: int,
        d_sae: int,
        sae_options: dict[str, Any],
        normalize: bool = True,
        lr: float = 3e-4,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        lr_scheduler: str = "constant",
        lr_warm_up_steps: int = 0,
        lr_decay_steps: int = 0,
        lr_end: float | None = None,
        total_steps: int = 1,
        dead_feature_window: int = 200,
    ):
        super().__init__()
        self.save_hyperparameters()
        cfg = training_sae_config(architecture, d_in, d_sae, sae_options, normalize)
        self.sae: TrainingSAE = get_sae_training_class(architecture)[0](cfg)
        self.register_buffer("act_scale", torch.tensor(1.0))
        self.register_buffer("steps_since_fired", torch.zeros(d_sae))
        self.coefficient_schedulers = {
            name: CoefficientScheduler(*_coefficient(c))
            for name, c in self.sae.get_coefficients().items()
        }

    @property
    def dead_mask(self) -> Tensor:
        """Latents that have not fired for more than dead_feature_window steps."""
        return self.steps_since_fired > self.hparams.dead_feature_window

    def training_step(self, batch: Annotated[Tensor, "batch d_in"], batch_idx: int) -> Tensor:
        x = batch.to(self.sae.dtype) * self.act_scale
        out = self.sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={n: s.value for n, s in self.coefficient_schedulers.items()},
                dead_neuron_mask=self.dead_mask,
                n_training_steps=self.global_step,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            acts = out.feature_acts.to_dense() if out.feature_acts.is_sparse else out.feature_acts
            fired = acts != 0
            self.steps_since_fired += 1
            self.steps_since_fired[fired.any(dim=0)] = 0
            if self._is_logging_step():  # Lightning's per-call logging cost adds up on tiny SAEs
                self.log_dict(self._metrics(x, out, fired), on_step=True)
        return out.loss

    def _is_logging_step(self) -> bool:
        """Whether the logger will record this step (so metrics are worth computing)."""
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        return (self.global_step + 1) % every == 0

    @torch.no_grad()
    def _metrics(self, x: Tensor, out: Any, fired: Tensor) -> dict[str, Tensor]:
        """Losses, l0, SAELens's explained variance (1 - E|x - x_hat|^2 / E|x - mean|^2), dead."""
        resid = (out.sae_out - x).pow(2).sum(-1).mean()
        total = (x - x.mean(0)).pow(2).sum(-1).mean()
        return {
            "train/loss": out.loss.detach(),
            "train/l0": fired.float().sum(-1).mean(),
            "train/explained_variance": 1 - resid / total,
            "train/dead_fraction": self.dead_mask.float().mean(),
            **{f"train/{k}": v.detach() for k, v in out.losses.items()},
        }

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.Adam(
            self.sae.parameters(), lr=hp.lr, betas=(hp.adam_beta1, hp.adam_beta2)
        )
        sched = get_lr_scheduler(
            hp.lr_scheduler,
            optimizer=opt,
            training_steps=hp.total_steps,
            lr=hp.lr,
            warm_up_steps=hp.lr_warm_up_steps,
            decay_steps=hp.lr_decay_steps,
            lr_end=hp.lr / 10 if hp.lr_end is None else hp.lr_end,
            num_cycles=1,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["coefficient_schedulers"] = {
            n: s.state_dict() for n, s in self.coefficient_schedulers.items()
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, state in checkpoint.get("coefficient_schedulers", {}).items():
            self.coefficient_schedulers[name].load_state_dict(state)


def _coefficient(c: Any) -> tuple[float, float]:
    """(warm_up_steps, final_value) of a SAELens coefficient given as a float or a config."""
    if isinstance(c, (int, float)):
        return 0, float(c)
    return c.warm_up_steps, c.value


class TokensPerSecond(Callback):
    """Logs rows (tokens) per second of the training loop, and keeps the run's totals."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += len(batch)
        self.seconds += time.perf_counter() - self._t0
        if trainer.global_step % trainer.log_every_n_steps == 0:
            pl_module.log("train/tokens_per_s", self.rate, on_step=True, prog_bar=True)

    @property
    def rate(self) -> float:
        """Tokens per second over every step of this run."""
        return self.tokens / self.seconds if self.seconds else float("nan")


# --- the whole run ---------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a training run hands back: the inference SAE (raw scale) and what happened."""

    sae: SAE
    scaling_factor: float
    stats: dict[str, Any]


def make_logger(cfg: SAETrainConfig, run_name: str):
    """CSV or wandb (offline unless a key exists) under ckpt_dir, or none."""
    if cfg.ckpt_dir is None or cfg.logger == "none":
        return False
    if cfg.logger == "wandb":
        from analoglock.tracking import wandb_logger

        return wandb_logger("analoglock-sae", cfg.ckpt_dir, run_name)
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(cfg.ckpt_dir, name="logs")


def _check_resumable(ckpt: Path, hparams: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another SAE (shape, architecture or SAELens options)."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    keys = ("architecture", "d_in", "d_sae", "sae_options", "normalize")
    diff = {k: (saved.get(k), hparams[k]) for k in keys if saved.get(k) != hparams[k]}
    if diff:
        raise ValueError(
            f"{ckpt} was trained with other settings {diff} (saved, requested); "
            "delete it or choose another ckpt_dir"
        )


def train_sae(
    x: Annotated[Tensor, "n d_model"] | ActivationStore,
    n_features: int,
    cfg: SAETrainConfig,
    hook: str = "",
    pos: Tensor | None = None,
    model_name: str = "",
) -> TrainResult:
    """Train a SAELens SAE of width n_features on rows; resume cfg.ckpt_dir/last.ckpt if present."""
    if int(n_features) < 1:
        raise ValueError(f"n_features (the SAE width d_sae) must be >= 1, got {n_features}")
    if isinstance(x, ActivationStore):
        if not hook:
            raise ValueError(f"give the hook to train on; {x.path} has {x.hooks}")
        x = rows_from_store(x, hook, cfg.exclude_bos)
    else:
        x = drop_bos(x.detach().float(), pos, cfg.exclude_bos)
    default_k = getattr(get_sae_training_class(cfg.architecture)[1], "k", None)
    check_rows(x, n_features, cfg.batch_size, cfg.sae.get("k", default_k))
    x = x.contiguous()

    scale = scaling_factor(x, cfg.batch_size, cfg.seed) if cfg.normalize else 1.0
    hp = dict(
        architecture=cfg.architecture,
        d_in=x.shape[1],
        d_sae=int(n_features),
        sae_options=dict(cfg.sae),
        normalize=cfg.normalize,
        lr=cfg.lr,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        lr_scheduler=cfg.lr_scheduler,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=cfg.lr_decay_steps,
        lr_end=cfg.lr_end,
        total_steps=cfg.total_steps,
        dead_feature_window=cfg.dead_feature_window,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        module = SAETrainingModule(**hp)
    module.act_scale.fill_(scale)
    if cfg.init_b_dec_to_mean and cfg.sae.get("apply_b_dec_to_input", True):
        with torch.no_grad():
            module.sae.b_dec.copy_(x.mean(0) * scale)

    resume = None
    callbacks: list[Callback] = [throughput := TokensPerSecond()]
    if cfg.ckpt_dir is not None:
        ckpt_dir = Path(cfg.ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        last = ckpt_dir / LAST_CKPT
        if last.exists():
            _check_resumable(last, hp)
            resume = str(last)
            log.info("Resuming SAE training from %s", last)
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="sae-{step}",
                save_last=True,
                save_top_k=1,
                every_n_train_steps=cfg.ckpt_every_n_steps,
            )
        )
    run_name = f"sae-{cfg.architecture}-{n_features}"
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        max_steps=cfg.total_steps,
        max_epochs=-1,
        gradient_clip_val=cfg.grad_clip,
        gradient_clip_algorithm="norm",
        callbacks=callbacks,
        logger=make_logger(cfg, run_name),
        enable_checkpointing=cfg.ckpt_dir is not None,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(50, cfg.total_steps, len(x) // cfg.batch_size)),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=cfg.ckpt_dir or tempfile.gettempdir(),
    )
    t0 = time.perf_counter()
    trainer.fit(
        module, RowBatches(x, cfg.batch_size, cfg.seed), ckpt_path=resume, weights_only=True
    )
    wall = time.perf_counter() - t0
    if cfg.ckpt_dir is not None:
        # ModelCheckpoint saves every n steps; the final step must be resumable too.
        trainer.save_checkpoint(Path(cfg.ckpt_dir) / LAST_CKPT, weights_only=False)
    sae = export_inference_sae(module, hook, model_name)
    stats = {
        "steps": int(trainer.global_step),
        "token_presentations": int(trainer.global_step) * cfg.batch_size,
        "epochs": int(trainer.global_step) * cfg.batch_size / len(x),
        "n_rows": len(x),
        "tokens_per_s": throughput.rate,
        "fit_wall_s": wall,
        "dead_fraction_train": float(module.dead_mask.float().mean()),
        "resumed_from": resume,
    }
    return TrainResult(sae, float(module.act_scale), stats)  # a resumed run keeps its scale


def export_inference_sae(module: SAETrainingModule, hook: str = "", model_name: str = "") -> SAE:
    """The inference SAE SAELens itself would save, with the activation scale folded in.

    Goes through SAELens's own `save_inference_model` + `SAE.load_from_disk`, so what we hold is
    exactly what SAELens loads (BatchTopK becomes JumpReLU; TopK decoder norms are folded).
    """
    sae = copy.deepcopy(module.sae).cpu()
    sae.cfg.metadata.hook_name = hook
    sae.cfg.metadata.model_name = model_name
    scale = float(module.act_scale)
    if sae.cfg.normalize_activations == "expected_average_only_in":
        sae.fold_activation_norm_scaling_factor(scale)  # raw activations in, raw out
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp)


def config_dict(cfg: SAETrainConfig) -> dict[str, Any]:
    """Flat options (training fields + SAELens fields), as SAEBasis stores them in cfg.json."""
    out = asdict(cfg)
    sae = out.pop("sae")
    return {**out, **sae}
