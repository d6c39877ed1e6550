"""Steering on the real SmolLM2: zero strength is exactly unsteered, and the controls move the
residual stream by exactly the lock's norm."""

from __future__ import annotations

import pytest
import torch

from analoglock.data import load_pairs
from analoglock.lock.export import LockArtifact
from analoglock.lock.maps import build_mapper
from analoglock.lock.steering import (
    POSITIONS,
    RowPositions,
    SteerOptions,
    build_task,
    covariance_directions,
    evaluate_test,
    map_steering,
    role_token_positions,
    steered_generate,
    steered_logprobs,
    vector_steering,
)
from analoglock.tokens import encode_texts

HOOK = "blocks.12.hook_resid_post"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def artifact(smollm2):
    """A small random affine lock at HOOK, with vectors from real activations of 6 train pairs."""
    pairs = load_pairs("fable_work", "train")[:6]
    acts = {}
    for side in ("a", "b"):
        rows = encode_texts(smollm2, [getattr(p, side) for p in pairs])
        xs = []
        for r in rows:
            _, cache = smollm2.run_with_cache(torch.tensor([r]), names_filter=[HOOK])
            xs.append(cache[HOOK][0, 1:].float())  # leave out the BOS sink
        acts[side] = torch.cat(xs)
    mapper = build_mapper("affine", d_model=576)
    with torch.no_grad():
        mapper.W_map.copy_(torch.randn(576, 576, generator=torch.Generator().manual_seed(0)) * 0.01)
        mapper.b_map.copy_(acts["b"].mean(0) - acts["a"].mean(0))
        learned = (mapper(acts["a"]) - acts["a"]).mean(0)
    vectors = {
        "learned": learned,
        "meandiff": acts["b"].mean(0) - acts["a"].mean(0),
        "cov_a": torch.cov(acts["a"].T),
    }
    return LockArtifact({"hook": HOOK, "dataset": "fable_work", "kind": "affine"}, mapper, vectors)


def test_zero_strength_reproduces_unsteered_logits_exactly(smollm2, artifact):
    prompts = [
        "Once upon a time, a slow tortoise and a proud hare agreed to run a race.",
        "A hungry fox saw some grapes.",
    ]
    roles = [role_token_positions(smollm2, p, ["tortoise", "hare", "fox"]) for p in prompts]
    rows = encode_texts(smollm2, prompts)
    clean = dict(steered_logprobs(smollm2, rows))
    base = steered_generate(smollm2, prompts, None, roles, max_new_tokens=6)
    for positions in POSITIONS:
        for s in (
            vector_steering(smollm2, HOOK, artifact.vectors["meandiff"], 0.0, positions),
            map_steering(smollm2, artifact.mapper, HOOK, 0.0, positions),
        ):
            for i, logp in steered_logprobs(smollm2, rows, s):
                assert torch.equal(logp, clean[i]), (s.kind, positions)
            assert steered_generate(smollm2, prompts, s, roles, max_new_tokens=6) == base
    moved = steered_generate(
        smollm2, prompts, map_steering(smollm2, artifact.mapper, HOOK, 1.0, "all"), roles, 6
    )
    assert moved.new_tokens != base.new_tokens  # the same hooks do act at full strength


def _residual(model, ids, hooks):
    """The residual at HOOK after `hooks` ran (hooks at one point run in the order given)."""
    seen = {}

    def capture(x, hook):
        seen["x"] = x.detach().clone()

    with model.hooks(fwd_hooks=[*hooks, (HOOK, capture)]):
        model(ids)
    return seen["x"]


def test_controls_have_the_lock_norm_declared_and_measured(smollm2, artifact):
    from analoglock.lock.judge import load_judge

    # Norms are what is tested here: the judge's domain centroids come from the 60 validation
    # pairs instead of the 280 train pairs (fewer stories to embed; any split but test will do).
    opts = SteerOptions(
        n_random=3, max_new_tokens=6, n_prompts=2, progress=False, ref_split="validation"
    )
    judge = load_judge()
    task = build_task(smollm2, judge, "fable_work", "test", opts)
    choice = {
        "lock": {"alpha": 0.5, "positions": "prompt"},
        "meandiff": {"scale": 1.0, "positions": "all"},
        "meandiff_best": {"scale": 2.0, "positions": "all"},
    }
    results, randoms = evaluate_test(smollm2, artifact, task, judge, choice, opts, HOOK)
    norm = 0.5 * float(artifact.vectors["learned"].norm())
    assert set(results) == {"unsteered", "lock", "meandiff", "meandiff_best", "meandiff_norm"}
    for control in (results["meandiff_norm"], *randoms):
        assert control.spec["norm"] == pytest.approx(norm, rel=1e-5)
        assert control.spec["positions"] == "prompt"  # the lock's positions
    assert results["lock"].spec["applied_norm"] > 0

    # Measured: each random direction moves every steered residual by exactly that norm.
    ids = torch.tensor(encode_texts(smollm2, [task.prompts[0].text]))
    n = ids.shape[1]
    clean = _residual(smollm2, ids, [])
    for z in covariance_directions(artifact.vectors["cov_a"], 3, norm, opts.seed):
        s = vector_steering(smollm2, HOOK, z, 1.0, "prompt")
        moved = (_residual(smollm2, ids, s.hooks([RowPositions(n, n)], n, "right")) - clean)[
            0
        ].norm(dim=-1)
        assert moved[0] == 0  # BOS is never steered
        torch.testing.assert_close(moved[1:], torch.full((n - 1,), norm), rtol=1e-4, atol=1e-4)
