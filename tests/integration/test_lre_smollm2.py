"""The LRE on the real SmolLM2, one relation at one layer with few samples: the protocol's counts
are stated, the operator decodes capitals the baselines do not, and its edits beat random ones."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def capital(smollm2):
    from analoglock.relations import RelationsContext
    from analoglock.relations.lre import run

    ctx = RelationsContext(model=smollm2, hooks=["blocks.8.hook_resid_post"], concepts={}, seed=0)
    cfg = {
        "relations": ["country_capital_city"],
        "n_jacobian": 2,
        "max_samples": 24,
        "n_pairs": 6,
        "ranks": [64],
        "edit_rank": 64,
        "lock_steps": 100,
        "n_boot": 200,
    }
    return run(cfg, ctx)


def test_the_split_states_its_sizes_and_keeps_only_correct_samples(capital):
    (r,) = capital["relations"]
    assert capital["layers"] == [8] and capital["main_layer"] == 8
    assert r["n_train"] == 5 and r["n_jacobian"] == 2 and r["n_drawn"] == 24
    assert 5 <= r["n_test"] == r["n_heldout_correct"] <= r["n_heldout"] == 19
    assert r["n_pairs"] == 6 and r["suffix_len"] == 2  # " Germany", " is"


def test_the_lre_decodes_the_object_where_every_baseline_fails(capital):
    at = capital["relations"][0]["by_layer"]["8"]
    f = {m: c["mean"] for m, c in at["faithfulness"].items()}
    assert f["lre"] >= 0.5, f
    assert all(
        f["lre"] > f[m] for m in ("identity", "translation", "linreg", "meandiff", "lock")
    ), f


def test_low_rank_lre_edits_change_the_answer_more_than_random_edits_of_their_norm(capital):
    at = capital["relations"][0]["by_layer"]["8"]
    assert at["causality"]["lre@64"]["mean"] > at["causality_random"]["lre@64"]["mean"]
    assert capital["summary"]["n_relations"] == 1
