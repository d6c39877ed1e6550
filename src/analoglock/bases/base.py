"""`FeatureBasis`: the shared shape of every fitted feature basis (SVD, PCA, NMF, CCA, ...).

A basis is fit once on activations at one hook, then frozen: `encode` turns activations
[..., d_model] into codes [..., n_features], `decode` turns codes back, and `directions` are the
decoder directions [n_features, d_model] that `matching` compares across bases. It satisfies
`analoglock.lock.maps.sparse.FeatureBasisLike`, so any basis can sit under a `SparseFeatureMap`.
Owns the artifact format (`basis.safetensors` + `cfg.json`, atomic writes) and the quality
numbers; knows nothing of models, harvesting or which variant it is beyond `kind`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from analoglock.atomic import save_tensors, write_json
from analoglock.bases.quality import FractionVarianceUnexplained

BASIS_FILE = "basis.safetensors"
CFG_FILE = "cfg.json"
BASIS_VERSION = 1
ACTIVE_EPS = 1e-6  # |code| above this counts as active for l0 and dead features
CHUNK_ROWS = 16_384  # rows encoded at once by quality / reconstruct


class BasisArtifactError(ValueError):
    """A basis directory that is missing files, holds another kind, or does not match its config."""


def as_rows(x: Tensor, name: str = "x") -> Tensor:
    """Check x is [n, d] with at least one row, all finite, as float; fit takes rows, not [..., d]."""
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be [n, d_model] with n >= 1, got shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x).all(dim=-1)
    if bad.any():
        raise FloatingPointError(
            f"{int(bad.sum())} of {len(x)} rows of {name} hold NaN or inf (first: row "
            f"{int(bad.nonzero()[0])}); a basis cannot be fit on them: filter those rows out."
        )
    return x.detach().float()


class FeatureBasis(nn.Module):
    """A frozen linear-ish feature basis at one hook; subclasses implement fit/encode/decode.

    Subclasses set `kind`, list their fitted tensors in `tensor_names` (registered as buffers,
    None until fit, so `.to()` moves them and save/load round-trips them), and return their
    constructor arguments from `config()` so `load` can rebuild them.
    """

    kind: ClassVar[str] = ""
    tensor_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, n_components: int, hook: str = ""):
        super().__init__()
        if int(n_components) < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        self.n_components = int(n_components)
        self.hook = hook
        self.d_model: int | None = None  # known once fit (or loaded)
        for name in self.tensor_names:
            self.register_buffer(name, None)

    # --- what subclasses provide -------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Constructor arguments other than hook (rebuilds an unfitted twin on load)."""
        return {"n_components": self.n_components}

    def fit(self, x: Annotated[Tensor, "n d_model"]) -> FeatureBasis:
        """Fit on rows of activations; returns self."""
        raise NotImplementedError

    def encode(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... n_features"]:
        """Activations to codes."""
        raise NotImplementedError

    def decode(
        self, codes: Annotated[Tensor, "... n_features"]
    ) -> Annotated[Tensor, "... d_model"]:
        """Codes to activations."""
        raise NotImplementedError

    @property
    def directions(self) -> Annotated[Tensor, "n_features d_model"]:
        """Decoder directions, one row per feature."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------

    @property
    def n_features(self) -> int:
        """Size of the code space (PCA with mean_as_feature has one more than n_components)."""
        return self.n_components

    @property
    def fitted(self) -> bool:
        """Whether every fitted tensor is present."""
        return all(getattr(self, name) is not None for name in self.tensor_names)

    def check_fitted(self) -> None:
        """Raise a clear error when used before fit/load."""
        if not self.fitted:
            raise RuntimeError(
                f"{type(self).__name__} is not fitted: call .fit(x) or load it first"
            )

    def forward(self, x: Annotated[Tensor, "... d_model"]) -> Annotated[Tensor, "... d_model"]:
        """Reconstruction decode(encode(x))."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def reconstruct(self, x: Annotated[Tensor, "n d_model"], chunk: int = CHUNK_ROWS) -> Tensor:
        """forward(x) on rows, `chunk` rows at a time (an SAE's codes for every row need not fit)."""
        return (
            torch.cat([self.forward(part) for part in x.split(chunk)])
            if len(x)
            else self.forward(x)
        )

    @torch.no_grad()
    def quality(
        self, x: Annotated[Tensor, "... d_model"], chunk: int = CHUNK_ROWS
    ) -> dict[str, float]:
        """fvu, mse, l0 (mean active codes per row) and dead_fraction (features never active on x).

        Streams `chunk` rows at a time: the codes of a million rows of a 4,608-latent SAE are 18 GB.
        """
        self.check_fitted()
        rows = x.reshape(-1, x.shape[-1])
        fvu = FractionVarianceUnexplained()
        sq_err = torch.zeros((), dtype=torch.float64)
        n_active = torch.zeros((), dtype=torch.float64)
        ever = torch.zeros(self.n_features, dtype=torch.bool)
        for part in rows.split(chunk) if len(rows) else [rows]:
            codes = self.encode(part)
            x_hat = self.decode(codes)
            fvu.update(part, x_hat)
            sq_err += (part.double() - x_hat.double()).pow(2).sum()
            active = codes.reshape(-1, codes.shape[-1]).abs() > ACTIVE_EPS
            n_active += active.sum()
            ever |= active.any(dim=0).cpu()
        return {
            "fvu": float(fvu.compute()),
            "mse": float(sq_err / rows.numel()),
            "l0": float(n_active / len(rows)),
            "dead_fraction": float((~ever).float().mean()),
        }

    def save(self, out_dir: str | Path, model: dict[str, Any] | None = None) -> Path:
        """Write `basis.safetensors` and `cfg.json` (kind, hook, dims, config, model) to out_dir."""
        self.check_fitted()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().cpu() for name in self.tensor_names}
        save_tensors(out / BASIS_FILE, tensors, metadata={"kind": self.kind})
        write_json(out / CFG_FILE, self.artifact_cfg(model))
        return out

    def artifact_cfg(self, model: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        """The cfg.json every basis writes (kind, version, hook, dims, config, model) plus `extra`."""
        return {
            "kind": self.kind,
            "version": BASIS_VERSION,
            "hook": self.hook,
            "n_features": self.n_features,
            "d_model": self.d_model,
            "config": self.config(),
            "model": model,
            **extra,
        }

    @classmethod
    def read_own_cfg(cls, in_dir: str | Path) -> dict[str, Any]:
        """The saved cfg.json, refusing a basis of another kind than this class."""
        cfg = read_basis_cfg(in_dir)
        if cfg.get("kind") != cls.kind:
            raise BasisArtifactError(
                f"{in_dir} holds a {cfg.get('kind')!r} basis, not {cls.kind!r}; "
                "use analoglock.bases.load_basis to pick the class from cfg.json"
            )
        return cfg

    @classmethod
    def load(cls, in_dir: str | Path) -> FeatureBasis:
        """Rebuild a saved basis of this class; refuses another kind or a size mismatch."""
        cfg = cls.read_own_cfg(in_dir)
        basis = cls(**cfg["config"], hook=cfg.get("hook", ""))
        path = Path(in_dir) / BASIS_FILE
        if not path.exists():
            raise BasisArtifactError(f"{in_dir} has cfg.json but no {BASIS_FILE}")
        tensors = load_file(str(path))
        missing = set(cls.tensor_names) - set(tensors)
        if missing:
            raise BasisArtifactError(f"{path} lacks tensors {sorted(missing)}")
        for name in cls.tensor_names:
            setattr(
                basis, name, tensors[name].clone()
            )  # own, aligned memory: same kernels, same bits
        basis.d_model = cfg["d_model"]
        if basis.n_features != cfg["n_features"]:
            raise BasisArtifactError(
                f"{in_dir}: cfg.json says n_features={cfg['n_features']}, tensors give "
                f"{basis.n_features}"
            )
        return basis

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, hook={self.hook!r}, n_features={self.n_features}, d_model={self.d_model}"


def read_basis_cfg(in_dir: str | Path) -> dict[str, Any]:
    """The cfg.json of a saved basis, or a BasisArtifactError saying what is missing."""
    path = Path(in_dir) / CFG_FILE
    if not path.exists():
        raise BasisArtifactError(
            f"{in_dir} is not a saved basis: no {CFG_FILE} (write one with FeatureBasis.save)"
        )
    return json.loads(path.read_text(encoding="utf-8"))
