"""The analogy lock on the real SmolLM2, default config: what it retrieves beside its baselines.

Kept short (3 epochs). What the default map must do on held-out test pairs: retrieve stories far
above chance, beat the identity map and the shuffled-pairs control on roles and stories, and its
control must not lock. It is NOT asserted to beat the mean difference: on this model it ties it
(docs/benchmarks.md), and the lock criterion says so by not locking.
"""

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
            "train",
            overrides=["logger=csv", f"out_dir={out}", "trainer.enable_progress_bar=false",
                       "trainer.max_epochs=3"],
        )  # fmt: skip
    os.environ.setdefault("WANDB_MODE", "offline")
    return train(cfg)[0]


def test_learned_map_beats_identity_and_its_control_on_heldout_pairs(lock_metrics):
    t = lock_metrics["test"]
    n_story = t["learned"]["n_story"]
    assert n_story == 60 and t["learned"]["n_roles"] > 150
    assert t["learned"]["top1_story"] > 10 / n_story  # chance is 1/60
    for key in ("top1_story", "mrr_roles"):
        assert t["learned"][key] > t["identity"][key], key
        assert t["learned"][key] > t["shuffled_control"][key], key
    assert lock_metrics["shuffled_control_locked"] is False
    # Every clause of the criterion was evaluated (none silently missing) and recorded per epoch.
    clauses = lock_metrics["history"][-1]["clauses"]
    assert {"top1_story_vs_meandiff", "top1_roles_vs_meandiff", "rel_err_roles_vs_identity"} <= set(
        clauses
    )
    if lock_metrics["locked"]:  # a lock means every applicable clause passed
        assert all(v is not False for v in clauses.values())
