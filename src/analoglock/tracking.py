"""Experiment trackers shared by every trainer (the lock, the SAE): wandb offline unless a key exists."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def wandb_logger(
    project: str, save_dir: str, name: str, offline: bool | None = None, **kwargs: Any
):
    """A WandbLogger with its own wandb run, offline unless an API key is configured (runs sync later).

    A run still open in this process (the previous job of a `--multirun` sweep) is finished first:
    Lightning's WandbLogger would otherwise adopt it, logging this job's metrics into that run and
    writing no `wandb/` folder under this job's `save_dir`.
    """
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    if wandb.run is not None:
        log.info("Finishing the open wandb run %s before starting %r", wandb.run.name, name)
        wandb.finish()
    if offline is None:
        offline = not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists())
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, name=name, offline=offline, **kwargs)
