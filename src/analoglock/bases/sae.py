"""SAE basis: a SAELens sparse autoencoder (TopK, BatchTopK, JumpReLU, standard) as a FeatureBasis.

Codes are the SAE's latent activations, directions are its decoder rows W_dec
[n_features, d_model]. `fit` trains it through `bases.sae_train` (Lightning around SAELens's own
training forward pass); the trained SAE is SAELens's inference class with the activation scale
folded in, so encode/decode take and give raw activations.

Artifact layout (a directory; `load_basis` reads the top cfg.json):
    cfg.json        ours: kind "sae", hook, n_features, d_model, options, model, scaling_factor
    sae/            SAELens's own format (cfg.json + sae_weights.safetensors); load it alone with
                    `sae_lens.SAE.load_from_disk(dir / "sae")`
Two cfg.json files cannot share a folder, hence the subdirectory. Knows nothing of harvesting.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from sae_lens import SAE
from torch import Tensor

from analoglock.activation_store import ActivationStore
from analoglock.atomic import write_json
from analoglock.bases.base import (
    CFG_FILE,
    BasisArtifactError,
    FeatureBasis,
)
from analoglock.bases.sae_train import SAETrainConfig, config_dict, train_sae

SAE_DIR = "sae"  # SAELens's folder inside our artifact


class SAEBasis(FeatureBasis):
    """A SAELens SAE of width n_components at one hook; options are SAETrainConfig + SAELens fields.

    `SAEBasis(4608, hook="blocks.15.hook_resid_post", architecture="topk", k=32, n_tokens=10**6)`
    """

    kind: ClassVar[str] = "sae"
    tensor_names: ClassVar[tuple[str, ...]] = ()  # the weights live in the SAELens module

    def __init__(
        self, n_components: int, hook: str = "", architecture: str = "topk", **options: Any
    ):
        if int(n_components) < 1:
            raise ValueError(f"n_features (the SAE width d_sae) must be >= 1, got {n_components}")
        super().__init__(n_components, hook=hook)
        self.train_cfg = SAETrainConfig.from_options(architecture, **options)
        self.sae: SAE | None = None
        self.scaling_factor: float | None = None  # folded into the weights; kept as a record
        self.model_meta: dict[str, Any] | None = None
        self.train_stats: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        return {"n_components": self.n_components, **config_dict(self.train_cfg)}

    @property
    def fitted(self) -> bool:
        return self.sae is not None

    def _adopt(self, sae: SAE) -> None:
        """Hold a trained/loaded SAELens SAE, frozen (a basis is never trained through encode)."""
        sae.eval().requires_grad_(False)
        self.sae = sae
        self.d_model = int(sae.cfg.d_in)

    def fit(
        self,
        x: Annotated[Tensor, "n d_model"] | ActivationStore,
        pos: Tensor | None = None,
    ) -> SAEBasis:
        """Train on rows (or a harvest's rows at self.hook); pos drops BOS rows (position 0)."""
        model_name = ""
        if isinstance(x, ActivationStore):
            model_name = x.meta["model"]["spec"]
            self.model_meta = dict(x.meta["model"])
        result = train_sae(x, self.n_components, self.train_cfg, self.hook, pos, model_name)
        self._adopt(result.sae)
        self.scaling_factor = result.scaling_factor
        self.train_stats = result.stats
        return self

    def _check_width(self, x: Tensor) -> None:
        """A clear error for activations of another width than the SAE's d_model."""
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"activations have d_model={x.shape[-1]}, this SAE was trained on "
                f"d_model={self.d_model} ({self.hook or 'unknown hook'})"
            )

    def encode(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... n_features"]:
        """The SAE's latent activations (SAELens encode), in the input's dtype."""
        self.check_fitted()
        self._check_width(x)
        return self.sae.encode(x).to(x.dtype if x.is_floating_point() else torch.float32)

    def decode(
        self, codes: Annotated[Tensor, "... n_features"]
    ) -> Annotated[Tensor, "... d_model"]:
        """codes @ W_dec + b_dec (SAELens decode)."""
        self.check_fitted()
        if codes.shape[-1] != self.n_features:
            raise ValueError(
                f"codes have {codes.shape[-1]} features, this SAE has {self.n_features}"
            )
        return self.sae.decode(codes.to(self.sae.dtype)).to(codes.dtype)

    @property
    def directions(self) -> Annotated[Tensor, "n_features d_model"]:
        """Decoder rows W_dec."""
        self.check_fitted()
        return self.sae.W_dec.detach()

    def check_compatible(
        self,
        hook: str | None = None,
        d_model: int | None = None,
        model: dict[str, Any] | None = None,
    ) -> None:
        """Raise if activations from (hook, d_model, model info) are not what this SAE was fit on."""
        self.check_fitted()
        if hook is not None and self.hook and hook != self.hook:
            raise ValueError(
                f"this SAE was trained on {self.hook!r}; the activations are from {hook!r}"
            )
        if d_model is not None and d_model != self.d_model:
            raise ValueError(
                f"this SAE was trained on d_model={self.d_model}; the activations have {d_model}"
            )
        mine = (self.model_meta or {}).get("sha256")
        if model is not None and mine and model.get("sha256") != mine:
            raise ValueError(
                f"this SAE was trained on model {self.model_meta.get('spec')!r} "
                f"(sha256 {mine[:12]}); the activations are from {model.get('spec')!r} "
                f"(sha256 {str(model.get('sha256'))[:12]})"
            )

    def check_store(self, store: ActivationStore, hook: str | None = None) -> None:
        """check_compatible against a harvest (its hook, d_model and model hash)."""
        hook = hook or self.hook or store.hooks[0]
        if hook not in store.hooks:
            raise ValueError(f"{store.path} has no {hook!r}; it has {store.hooks}")
        self.check_compatible(hook, int(store.meta["d_model"]), store.meta["model"])

    def save(self, out_dir: str | Path, model: dict[str, Any] | None = None) -> Path:
        """Write SAELens's folder to out_dir/sae (swapped in whole), then our cfg.json (the commit)."""
        self.check_fitted()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if model is not None:
            self.model_meta = dict(model)
        self.sae.cfg.metadata.hook_name = self.hook
        self.sae.cfg.metadata.model_name = (self.model_meta or {}).get("spec", "")
        final, tmp, old = out / SAE_DIR, out / f".{SAE_DIR}.tmp-{os.getpid()}", None
        shutil.rmtree(tmp, ignore_errors=True)
        self.sae.save_model(tmp)
        if final.exists():
            old = out / f".{SAE_DIR}.old-{os.getpid()}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)
        write_json(
            out / CFG_FILE,
            self.artifact_cfg(
                self.model_meta,
                sae_dir=SAE_DIR,
                sae_architecture=self.sae.cfg.architecture(),
                scaling_factor=self.scaling_factor,
                training=self.train_stats,
            ),
        )
        return out

    @classmethod
    def load(cls, in_dir: str | Path) -> SAEBasis:
        """Rebuild from our cfg.json and SAELens's folder (loaded by SAELens's own loader)."""
        cfg = cls.read_own_cfg(in_dir)
        sae_path = Path(in_dir) / cfg.get("sae_dir", SAE_DIR)
        if not (sae_path / CFG_FILE).exists():
            raise BasisArtifactError(f"{in_dir} has our cfg.json but no SAELens folder {sae_path}")
        basis = cls(**cfg["config"], hook=cfg.get("hook", ""))
        sae = SAE.load_from_disk(sae_path)
        if sae.cfg.d_sae != cfg["n_features"] or sae.cfg.d_in != cfg["d_model"]:
            raise BasisArtifactError(
                f"{in_dir}: cfg.json says n_features={cfg['n_features']}, d_model={cfg['d_model']}; "
                f"the SAELens weights are d_sae={sae.cfg.d_sae}, d_in={sae.cfg.d_in}"
            )
        basis._adopt(sae)
        basis.model_meta = cfg.get("model")
        basis.scaling_factor = cfg.get("scaling_factor")
        basis.train_stats = cfg.get("training", {})
        return basis
