"""analoglock-fit-basis: fit a feature basis on a harvest and print its quality metrics."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from analoglock.cli._conf import CONF_PATH


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="fit_basis")
def main(cfg: DictConfig) -> None:
    """Check the harvest and out_dir, load the model if splicing, fit, measure, save; print metrics."""
    from analoglock.atomic import finite
    from analoglock.bases.fit import fit_basis_on_store, open_harvest

    # everything the inputs alone decide fails here, before the model loads
    open_harvest(cfg.acts, cfg.basis, cfg.out_dir, cfg.hook, cfg.allow_incomplete)
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
        split=cfg.split,
        allow_incomplete=cfg.allow_incomplete,
    )
    print(json.dumps(finite(metrics), indent=2, allow_nan=False))
    print(f"wrote {cfg.out_dir}/ (cfg.json, weights, metrics.json)")


if __name__ == "__main__":
    main()
