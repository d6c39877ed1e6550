"""analoglock-fit-basis: fit a feature basis on a harvest and print its quality metrics."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from analoglock.cli._conf import CONF_DIR


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="fit_basis")
def main(cfg: DictConfig) -> None:
    """Fit, measure, save; print metrics.json."""
    from analoglock.bases.fit import fit_basis_on_store

    model = (
        hydra.utils.instantiate(cfg.model) if cfg.splice_docs > 0 and cfg.basis != "cca" else None
    )
    metrics = fit_basis_on_store(
        cfg.acts,
        cfg.basis,
        cfg.n_features,
        cfg.out_dir,
        cfg.hook,
        cfg.holdout_fraction,
        cfg.seed,
        model,
        cfg.splice_docs,
        basis_kwargs=OmegaConf.to_container(cfg.sae, resolve=True) if cfg.basis == "sae" else None,
    )
    print(json.dumps(metrics, indent=2))
    print(f"wrote {cfg.out_dir}/ (cfg.json, weights, metrics.json)")


if __name__ == "__main__":
    main()
