"""The analogy lock on the real SmolLM2: the learned map must beat its shuffled-pairs control."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir

from analoglock.cli._conf import CONF_DIR


@pytest.fixture(scope="module")
def lock_metrics(tmp_path_factory):
    from analoglock.lock.train import train

    out = tmp_path_factory.mktemp("lock")
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(
            "train", overrides=["logger=csv", f"out_dir={out}", "trainer.enable_progress_bar=false"]
        )
    os.environ.setdefault("WANDB_MODE", "offline")
    return train(cfg)


def test_learned_lock_beats_controls_on_heldout_stories(lock_metrics):
    m = lock_metrics
    chance = m["chance_top1"]["story"]
    # Held-out fable -> workplace story retrieval: far above chance, above the same training on
    # shuffled pairs, and at least as good as the best closed-form baseline.
    assert m["heldout_top1_story"] > 5 * chance
    assert m["heldout_top1_story"] > m["shuffled_control_top1_story"] + 0.2
    assert m["heldout_top1_story"] >= max(m["meandiff_top1_story"], m["procrustes_top1_story"])
    assert m["shuffled_control_locked"] is False
    assert (
        m["locked"] and m["lock_epoch"] is not None
    )  # the default demo config locks; its control does not
