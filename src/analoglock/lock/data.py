"""The LightningDataModule the lock trainer reads: (a, b, view group) rows of paired activations.

Owns batching, the data order (a seeded generator whose state is checkpointed, so a resumed run
draws the same batches as an uninterrupted one) and the shuffled-pairs control (partners
deranged within each view: story rows with story rows, role rows with role rows). Validation is
scored by the module on the whole split, so its loader yields a single placeholder item. Knows
nothing of maps or losses; the pairs come from `analoglock.paired`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from analoglock.paired import PairedActivations, view_group
from analoglock.stats import derange_within

GROUP_INDEX = {"story": 0, "roles": 1, "mentions": 2}


class PairedDataModule(L.LightningDataModule):
    """Loaders of (a, b, group) over paired activations; optionally deranged partners (control)."""

    def __init__(
        self,
        paired: PairedActivations,
        batch_size: int = 64,
        shuffle_pairs_seed: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.paired = paired
        self.batch_size = batch_size
        self.shuffle_pairs_seed = shuffle_pairs_seed
        self.num_workers = num_workers
        self.generator = torch.Generator().manual_seed(seed)
        for split in ("train", "validation"):
            part = paired.subset(split)
            if len(part) < 2:
                raise ValueError(
                    f"Need at least 2 {split} pairs, got {len(part)}: is the data one-sided or empty?"
                )

    def train_pairs(self) -> PairedActivations:
        """The training rows as the trainer sees them (partners deranged for the control)."""
        part = self.paired.subset("train")
        if self.shuffle_pairs_seed is None:
            return part
        groups = [view_group(v) for v in part.view]
        perm = derange_within(groups, torch.Generator().manual_seed(self.shuffle_pairs_seed))
        return PairedActivations(part.a, part.b[perm], part.pair, part.view, part.split)

    def _dataset(self, part: PairedActivations) -> TensorDataset:
        group = torch.tensor([GROUP_INDEX[view_group(v)] for v in part.view], dtype=torch.long)
        return TensorDataset(part.a, part.b, group)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._dataset(self.train_pairs()),
            batch_size=self.batch_size,
            shuffle=True,
            generator=self.generator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        # One placeholder item: the module scores the whole validation split at epoch end.
        return DataLoader(TensorDataset(torch.zeros(1)), batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        """The data order's generator state, saved in the checkpoint for an exact resume."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
