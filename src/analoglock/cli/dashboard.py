"""analoglock-dashboard: write a basis's feature dashboard (optionally labelling features first)."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from analoglock.cli._conf import CONF_PATH


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="dashboard")
def main(cfg: DictConfig) -> None:
    """Check basis/harvest/model agree, optionally label, render; print where the page is."""
    from analoglock.activation_store import ActivationStore
    from analoglock.atomic import check_out_dir
    from analoglock.bases import load_basis, read_basis_cfg
    from analoglock.bases.contexts import feature_codes
    from analoglock.model import model_info
    from analoglock.reports.dashboard import (
        DASHBOARD_FILE,
        check_compatible,
        feature_order,
        load_labels,
        write_dashboard,
    )

    start = time.perf_counter()
    out = Path(cfg.out) if cfg.out else Path(cfg.basis) / DASHBOARD_FILE
    check_out_dir(out.parent)  # like every check below: fail before loading a model
    if out.is_dir():
        raise IsADirectoryError(f"out={out} is a directory; give the HTML file's path.")
    store = ActivationStore(cfg.acts)
    hook = check_compatible(read_basis_cfg(cfg.basis), store.meta)
    basis = load_basis(cfg.basis)
    acts = store.load([hook])
    model = hydra.utils.instantiate(cfg.model)
    check_compatible(read_basis_cfg(cfg.basis), store.meta, model_info(model).sha256)
    codes = feature_codes(basis, acts, progress=cfg.progress)

    if cfg.label:
        try:
            from analoglock.bases.labels import label_features, write_labels
        except ImportError as e:
            raise SystemExit(
                f"label=true needs analoglock.bases.labels, which is missing: {e}"
            ) from e
        features = feature_order(codes)[: cfg.n_features]
        t = time.perf_counter()
        labels = label_features(
            model,
            basis,
            acts,
            features=features,
            n_explain=cfg.label_n_explain,
            n_detect=cfg.label_n_detect,
            seed=cfg.seed,
            batch_size=cfg.label_batch_size,
            progress=cfg.progress,
            window=tuple(cfg.window),
            codes=codes,
        )
        path = write_labels(cfg.basis, labels, model_info(model))
        print(f"labelled {len(labels)} features in {time.perf_counter() - t:.1f} s -> {path}")
    labels = load_labels(cfg.basis, model)

    page = write_dashboard(
        basis,
        acts,
        model,
        out,
        labels=labels,
        k=cfg.k,
        n_features=cfg.n_features,
        window=tuple(cfg.window),
        lens_k=cfg.lens_k,
        seed=cfg.seed,
        codes=codes,
        progress=cfg.progress,
    )
    shown = min(cfg.n_features, basis.n_features)
    print(
        f"wrote {page} ({page.stat().st_size / 1e6:.1f} MB): {basis.n_features} features indexed, "
        f"{shown} with sections, labels: {'yes' if labels else 'none'}; "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
