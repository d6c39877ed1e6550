"""analoglock-fit-basis: fit a feature basis on a harvest and print its quality metrics.

With evaluate=<basis dir> nothing is fit: that saved basis is measured on this harvest's held-out
documents (e.g. the corpus SAE on the fable_work stories a lock is tested on), paired with any
basis fit on the same harvest (`scripts/bench_bases.py --compare`).
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from analoglock.cli._conf import CONF_PATH


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="fit_basis")
def main(cfg: DictConfig) -> None:
    """Check the harvest and out_dir, load the model if splicing, fit, measure, save; print metrics."""
    from analoglock.atomic import finite
    from analoglock.bases.fit import (
        evaluate_basis_on_store,
        fit_basis_on_store,
        open_evaluation,
        open_harvest,
    )

    # everything the inputs alone decide fails here, before the model loads
    if cfg.evaluate:
        open_evaluation(cfg.evaluate, cfg.acts, cfg.out_dir, cfg.allow_incomplete)
    else:
        open_harvest(cfg.acts, cfg.basis, cfg.out_dir, cfg.hook, cfg.allow_incomplete)
    splice = cfg.splice_docs > 0 and (cfg.evaluate or cfg.basis != "cca")
    model = hydra.utils.instantiate(cfg.model) if splice else None
    if cfg.evaluate:
        metrics = evaluate_basis_on_store(
            cfg.evaluate,
            cfg.acts,
            cfg.out_dir,
            cfg.holdout_fraction,
            cfg.seed,
            model,
            cfg.splice_docs,
            split=cfg.split,
            allow_incomplete=cfg.allow_incomplete,
        )
        wrote = "metrics.json, heldout_per_doc.json"
    else:
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
            basis_kwargs=OmegaConf.to_container(cfg.sae, resolve=True)
            if cfg.basis == "sae"
            else None,
            split=cfg.split,
            allow_incomplete=cfg.allow_incomplete,
        )
        wrote = "cfg.json, weights, metrics.json"
    print(json.dumps(finite(metrics), indent=2, allow_nan=False))
    print(f"wrote {cfg.out_dir}/ ({wrote})")


if __name__ == "__main__":
    main()
