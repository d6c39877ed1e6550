"""Experiment trackers shared by every trainer (the lock, the SAE): wandb offline unless a key exists."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def wandb_logger(
    project: str, save_dir: str, name: str, offline: bool | None = None, **kwargs: Any
):
    """A WandbLogger that runs offline unless an API key is configured (runs sync later)."""
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists())
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, name=name, offline=offline, **kwargs)
