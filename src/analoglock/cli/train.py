"""analoglock-train: fit an analogy lock between two domains and print its metrics beside the controls."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from analoglock.cli._conf import CONF_PATH


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="train")
def main(cfg: DictConfig) -> float:
    """Train, write report.html, print the headline (returns validation-free test MRR for sweeps)."""
    from analoglock.lock.train import train
    from analoglock.reports.lock import lock_report

    metrics, objects = train(cfg)
    if not metrics:  # a non-zero DDP rank
        return float("nan")
    figures = lock_report(metrics, cfg.out_dir)
    logger = objects["module"].logger
    if type(logger).__name__ == "WandbLogger":
        import wandb

        logger.experiment.log({name: wandb.Plotly(fig) for name, fig in figures.items()})
        logger.experiment.summary.update({f"test/{m}/{k}": v for m, d in metrics["test"].items()
                                          for k, v in d.items()})  # fmt: skip
    head = {k: metrics[k] for k in ("locked", "lock_epoch", "epochs_run", "not_applicable",
                                     "shuffled_control_locked", "n_pairs")}  # fmt: skip
    head["test"] = {m: {k: round(v, 3) for k, v in d.items() if not k.startswith("n_")}
                    for m, d in metrics["test"].items()}  # fmt: skip
    print(json.dumps(head, indent=1))
    print(f"wrote {cfg.out_dir}/metrics.json, lock.safetensors, report.html, last.ckpt")
    return float(metrics["test"]["learned"].get("mrr_roles", float("nan")))


if __name__ == "__main__":
    main()
