"""The LightningDataModule the lock trainer reads: (a, b, view group) rows of paired activations.

Owns batching and the shuffled-pairs control (partners deranged within each view). Knows nothing
of maps or losses; the pairs themselves come from `analoglock.paired`.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from analoglock.paired import PairedActivations
from analoglock.stats import derange


class PairedDataModule(L.LightningDataModule):
    """Loaders of (a, b, group) over paired activations (group 0 story, 1 roles); optionally deranged pairs."""

    def __init__(
        self,
        paired: PairedActivations,
        batch_size: int = 64,
        shuffle_pairs_seed: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        self.paired = paired
        self.batch_size = batch_size
        self.shuffle_pairs_seed = shuffle_pairs_seed
        self.num_workers = num_workers
        for split in ("train", "validation"):
            part = paired.subset(split)
            if len(part) < 2:
                raise ValueError(
                    f"Need at least 2 {split} pairs, got {len(part)}: is the data one-sided or empty?"
                )

    def _dataset(self, split: str) -> TensorDataset:
        part = self.paired.subset(split)
        b = part.b
        if split == "train" and self.shuffle_pairs_seed is not None:
            perm = derange(len(part), torch.Generator().manual_seed(self.shuffle_pairs_seed))
            b = b[perm]  # the shuffled-pairs control: same data, partners broken
        group = torch.tensor([0 if v == "story" else 1 for v in part.view], dtype=torch.long)
        return TensorDataset(part.a, b, group)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._dataset("train"),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        # One batch holding the whole held-out set: retrieval ranks among all candidates.
        ds = self._dataset("validation")
        return DataLoader(ds, batch_size=len(ds), num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        ds = self._dataset("test")
        return DataLoader(ds, batch_size=max(1, len(ds)), num_workers=self.num_workers)
