"""analoglock-train: fit an analogy lock between two domains and print its metrics beside the controls."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from analoglock.cli._conf import CONF_DIR


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """Train, then print the headline metrics (returns held-out top-1 for sweeps)."""
    from analoglock.lock.train import train

    metrics = train(cfg)
    if not metrics:  # a non-zero DDP rank
        return float("nan")
    keys = [
        "locked",
        "lock_epoch",
        "epochs_run",
        "heldout_top1",
        "heldout_top5",
        "equivariance_error",
        "shuffled_control_top1",
        "shuffled_control_locked",
        "meandiff_top1",
        "procrustes_top1",
        "identity_top1",
        "heldout_top1_story",
        "shuffled_control_top1_story",
        "meandiff_top1_story",
        "procrustes_top1_story",
        "identity_top1_story",
        "chance_top1",
        "n_pairs",
    ]
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    print(f"wrote {cfg.out_dir}/metrics.json, relation.safetensors, report.html, last.ckpt")
    return float(metrics["heldout_top1"])


if __name__ == "__main__":
    main()
