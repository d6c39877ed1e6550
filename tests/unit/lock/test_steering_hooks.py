"""Steering hooks on the tiny random Llama: exact no-ops, exact adds at exactly the chosen
positions, generation and teacher forcing agreeing, refusals before anything runs."""

from __future__ import annotations

import math

import pytest
import torch

from analoglock.generation import encode_prompts, generate
from analoglock.lock.maps import build_mapper
from analoglock.lock.steering import (
    POSITIONS,
    RowPositions,
    SteeringError,
    add_vector_hook,
    apply_map_hook,
    combined_steering,
    covariance_directions,
    map_steering,
    position_mask,
    random_control,
    role_token_positions,
    steer,
    steered_generate,
    steered_logprobs,
    vector_steering,
)
from analoglock.tokens import encode_texts

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["Once upon a time, a tortoise and a hare", "A fox saw some grapes"]
ROLES = ("tortoise", "hare", "fox")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vector():
    return torch.randn(64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ids(tiny_model):
    return encode_prompts(tiny_model, PROMPTS)


@pytest.fixture(scope="module")
def mapper():
    m = build_mapper("affine", d_model=64)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    return m


def roles_of(model, prompts=PROMPTS):
    return [role_token_positions(model, p, ROLES) for p in prompts]


# ---------------------------------------------------------------- no-ops and exact adds


def test_scale_zero_reproduces_logits_and_generation_exactly(tiny_model, ids, vector):
    tokens, mask = ids
    clean = tiny_model(tokens, attention_mask=mask)
    with steer(tiny_model, HOOK, add_vector_hook(vector, 0.0)):
        steered = tiny_model(tokens, attention_mask=mask)
    assert torch.equal(clean, steered)
    base = generate(tiny_model, PROMPTS, max_new_tokens=6)
    zero = generate(
        tiny_model, PROMPTS, max_new_tokens=6, fwd_hooks=[(HOOK, add_vector_hook(vector, 0.0))]
    )
    assert zero == base
    big = generate(
        tiny_model, PROMPTS, max_new_tokens=6, fwd_hooks=[(HOOK, add_vector_hook(vector, 50.0))]
    )
    assert big.new_tokens != base.new_tokens  # the hook does reach generation


@pytest.mark.parametrize("positions", POSITIONS)
def test_zero_strength_steering_is_exact_at_every_positions_rule(
    tiny_model, vector, mapper, positions
):
    base = steered_generate(tiny_model, PROMPTS, None, max_new_tokens=5)
    roles = roles_of(tiny_model)
    for s in (
        vector_steering(tiny_model, HOOK, vector, 0.0, positions),
        map_steering(tiny_model, mapper, HOOK, 0.0, positions),
    ):
        assert steered_generate(tiny_model, PROMPTS, s, roles, max_new_tokens=5) == base
        rows = encode_texts(tiny_model, PROMPTS)
        clean = dict(steered_logprobs(tiny_model, rows))
        for i, logp in steered_logprobs(tiny_model, rows, s):
            assert torch.equal(logp, clean[i])


def test_added_vector_changes_the_residual_by_exactly_scale_times_vector(tiny_model, ids, vector):
    tokens, _ = ids
    _, clean = tiny_model.run_with_cache(tokens[:1], names_filter=[HOOK])
    seen = {}

    def capture(x, hook):
        seen["x"] = x.clone()

    with tiny_model.hooks(fwd_hooks=[(HOOK, add_vector_hook(vector, 3.0)), (HOOK, capture)]):
        tiny_model(tokens[:1])
    assert torch.equal(seen["x"], clean[HOOK] + 3.0 * vector)


def test_new_positions_only_touch_the_last_prompt_token_and_decode_steps(vector):
    fn = add_vector_hook(vector, 2.0, positions="new")
    x = torch.randn(2, 5, 64)
    out = fn(x)
    assert torch.equal(out[:, :-1], x[:, :-1])
    assert torch.equal(out[:, -1], x[:, -1] + 2.0 * vector)
    step = torch.randn(2, 1, 64)
    assert torch.equal(fn(step), step + 2.0 * vector)
    with pytest.raises(ValueError, match="positions"):
        add_vector_hook(vector, 1.0, positions="prompt")  # needs a mask
    with pytest.raises(ValueError, match="positions"):
        add_vector_hook(vector, 1.0, positions="middle")


def test_steer_removes_its_hook_even_on_error(tiny_model, ids, vector):
    tokens, mask = ids
    clean = tiny_model(tokens, attention_mask=mask)
    with pytest.raises(RuntimeError), steer(tiny_model, HOOK, add_vector_hook(vector, 10.0)):
        raise RuntimeError
    assert torch.equal(tiny_model(tokens, attention_mask=mask), clean)


# ---------------------------------------------------------------- positions


def test_position_masks_follow_each_rule_and_the_padding_side():
    rows = [RowPositions(4, 6, (2, 3)), RowPositions(2, 3, (1,))]
    want = {  # unpadded indices per row; index 0 (BOS) is never steered
        "all": [[1, 2, 3, 4, 5], [1, 2]],
        "prompt": [[1, 2, 3], [1]],
        "new": [[3, 4, 5], [1, 2]],
        "roles": [[2, 3], [1]],
    }
    for positions, idx in want.items():
        right = position_mask(positions, rows, 7, "right")
        left = position_mask(positions, rows, 7, "left")
        for i, (row, where) in enumerate(zip(rows, idx, strict=True)):
            assert right[i].nonzero().flatten().tolist() == where
            offset = 7 - row.n_total
            assert left[i].nonzero().flatten().tolist() == [w + offset for w in where]
    assert RowPositions(3, 3, (0, 1), skip_first=False).indices("roles") == [0, 1]
    with pytest.raises(ValueError, match="positions"):
        position_mask("everything", rows, 7, "left")


def test_apply_map_hook_alpha_zero_is_a_no_op_and_one_is_the_map(tiny_model, ids, mapper):
    x = torch.randn(2, 5, 64)
    assert torch.equal(apply_map_hook(mapper, 0.0)(x), x)
    torch.testing.assert_close(apply_map_hook(mapper, 1.0)(x), mapper(x))
    tokens, mask = ids
    clean = tiny_model(tokens, attention_mask=mask)
    with steer(tiny_model, HOOK, apply_map_hook(mapper, 0.0)):
        assert torch.equal(tiny_model(tokens, attention_mask=mask), clean)


def test_masked_map_hook_changes_exactly_the_masked_rows(mapper):
    x = torch.randn(2, 5, 64)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True
    out = apply_map_hook(mapper, 1.0, "roles", mask)(x)
    torch.testing.assert_close(out[mask], mapper(x[mask]))
    assert torch.equal(out[~mask], x[~mask])
    half = apply_map_hook(mapper, 0.5, "roles", mask)(x)
    torch.testing.assert_close(half[mask], x[mask] + 0.5 * (mapper(x[mask]) - x[mask]))
    # After the prompt pass, a decode step is steered only by "new" and "all".
    for positions, steered in (("roles", False), ("prompt", False), ("new", True), ("all", True)):
        fn = apply_map_hook(mapper, 1.0, positions, mask)
        fn(x)
        step = torch.randn(2, 1, 64)
        assert torch.equal(fn(step), step) is not steered


def test_masked_hook_refuses_a_batch_it_was_not_built_for(vector):
    fn = add_vector_hook(vector, 1.0, "prompt", torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(SteeringError, match="mask"):
        fn(torch.randn(3, 5, 64))
    fn = add_vector_hook(vector, 1.0, "prompt", torch.ones(2, 5, dtype=torch.bool))
    fn(torch.randn(2, 5, 64))
    with pytest.raises(SteeringError, match="second full pass"):
        fn(torch.randn(2, 5, 64))


def test_role_steering_adds_the_vector_at_exactly_the_role_tokens(tiny_model, vector):
    s = vector_steering(tiny_model, HOOK, vector, 2.0, "roles")
    rows = encode_texts(tiny_model, PROMPTS)
    roles = roles_of(tiny_model)
    where = [RowPositions(len(r), len(r), roles[i]) for i, r in enumerate(rows)]
    seen = []
    width = max(len(r) for r in rows)
    mask = position_mask("roles", where, width, "right")
    fn = s.hooks(where, width, "right")[0][1]
    x = torch.randn(len(rows), width, 64)
    out = fn(x)
    delta = (out - x).norm(dim=-1) > 0
    assert torch.equal(delta, mask)
    for i, r in enumerate(rows):
        words = [tiny_model.tokenizer.decode([r[j]]).strip().lower() for j in roles[i]]
        seen += words
        assert set(words) <= set(ROLES)
    assert {"tortoise", "hare", "fox"} <= set(seen)


def test_combined_steering_maps_the_role_tokens_then_adds_the_vector_everywhere(
    tiny_model, vector, mapper
):
    rows = encode_texts(tiny_model, PROMPTS)
    roles = roles_of(tiny_model)
    where = [RowPositions(len(r), len(r), roles[i]) for i, r in enumerate(rows)]
    width = max(len(r) for r in rows)
    both = combined_steering(
        map_steering(tiny_model, mapper, HOOK, 0.5, "roles"),
        vector_steering(tiny_model, HOOK, vector, 2.0, "all"),
    )
    hooks = both.hooks(where, width, "right")
    assert [h for h, _ in hooks] == [HOOK, HOOK]
    x = torch.randn(len(rows), width, 64)
    out = x
    for _, fn in hooks:
        out = fn(out)
    at_roles = position_mask("roles", where, width, "right")
    everywhere = position_mask("all", where, width, "right")  # every token but the BOS
    want = x.clone()
    want[at_roles] = x[at_roles] + 0.5 * (mapper(x[at_roles]) - x[at_roles])
    want = want + everywhere.unsqueeze(-1) * (2.0 * vector)
    torch.testing.assert_close(out, want)
    assert both.describe()["parts"][1] == {
        "kind": "vector", "hook": HOOK, "positions": "all", "scale": 2.0,
        "norm": pytest.approx(2.0 * float(vector.norm())),
    }  # fmt: skip
    assert combined_steering(both, both).parts == both.parts * 2  # sums flatten
    assert both.norm is None and "scale" not in both.describe()  # a map's push depends on x
    with pytest.raises(SteeringError, match="at least one"):
        combined_steering()
    # generating under the sum runs both hooks (the map's own counter sees the role rows)
    before = both.parts[0].stats["n"]
    steered_generate(tiny_model, PROMPTS, both, roles, max_new_tokens=2)
    assert both.parts[0].stats["n"] - before == sum(len(r) for r in roles) > 0


@pytest.mark.parametrize("positions", POSITIONS)
def test_generation_and_teacher_forcing_steer_the_same_positions(tiny_model, mapper, positions):
    """Causal consistency: the greedy tokens of a steered generation are the argmax of a
    teacher-forced steered pass over prompt + continuation, at every positions rule."""
    s = map_steering(tiny_model, mapper, HOOK, 1.0, positions)
    roles = roles_of(tiny_model)
    gen = steered_generate(tiny_model, PROMPTS, s, roles, max_new_tokens=6)
    base = steered_generate(tiny_model, PROMPTS, None, max_new_tokens=6)
    if positions != "roles":  # "roles" may leave short prompts with few changes; others must act
        assert gen.new_tokens != base.new_tokens
    prompt_rows = encode_texts(tiny_model, PROMPTS)
    rows = [p + g for p, g in zip(prompt_rows, gen.new_tokens, strict=True)]
    where = [
        RowPositions(len(p), len(r), roles[i])
        for i, (p, r) in enumerate(zip(prompt_rows, rows, strict=True))
    ]
    for i, logp in steered_logprobs(tiny_model, rows, s, where):
        n = len(prompt_rows[i])
        greedy = logp[n - 1 : len(rows[i]) - 1].argmax(-1).tolist()
        assert greedy == gen.new_tokens[i]


def test_batching_does_not_change_steered_generation(tiny_model, mapper):
    s = map_steering(tiny_model, mapper, HOOK, 1.0, "roles")
    roles = roles_of(tiny_model)
    together = steered_generate(tiny_model, PROMPTS, s, roles, max_new_tokens=5, batch_size=2)
    apart = steered_generate(tiny_model, PROMPTS, s, roles, max_new_tokens=5, batch_size=1)
    assert together.new_tokens == apart.new_tokens


# ---------------------------------------------------------------- refusals


def test_map_steering_refusals(tiny_model, mapper):
    with pytest.raises(SteeringError, match=r"trained at 'blocks.1.hook_resid_post'.*'blocks.2"):
        map_steering(tiny_model, mapper, HOOK, 0.5, hook="blocks.2.hook_resid_post")
    for alpha in (-0.1, 1.5):
        with pytest.raises(SteeringError, match="allow_extrapolation"):
            map_steering(tiny_model, mapper, HOOK, alpha)
    assert map_steering(tiny_model, mapper, HOOK, 1.5, allow_extrapolation=True).strength == 1.5
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(SteeringError, match="finite"):
            map_steering(tiny_model, mapper, HOOK, alpha, allow_extrapolation=True)
    wide = build_mapper("affine", d_model=32)
    with pytest.raises(SteeringError, match="d_model=64"):
        map_steering(tiny_model, wide, HOOK, 0.5)


def test_vector_steering_refuses_before_any_hook_runs(tiny_model, vector):
    calls = []
    tiny_model.add_hook(HOOK, lambda x, hook: calls.append(1))  # would see any forward pass
    try:
        with pytest.raises(SteeringError, match="shape \\(63,\\).*d_model=64"):
            vector_steering(tiny_model, HOOK, vector[:63], 1.0)
        for scale in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(SteeringError, match="finite"):
                vector_steering(tiny_model, HOOK, vector, scale)
        bad = vector.clone()
        bad[0] = float("nan")
        with pytest.raises(SteeringError, match="NaN"):
            vector_steering(tiny_model, HOOK, bad, 1.0)
        with pytest.raises(ValueError, match="Unknown hook"):
            vector_steering(tiny_model, "blocks.1.hook_nothing", vector, 1.0)
    finally:
        tiny_model.reset_hooks()
    assert calls == []


def test_steering_describes_its_norm(tiny_model, vector, mapper):
    s = vector_steering(tiny_model, HOOK, vector, -2.0, "new")
    assert s.describe() == {
        "kind": "vector", "hook": HOOK, "positions": "new", "scale": -2.0,
        "norm": pytest.approx(2.0 * float(vector.norm())),
    }  # fmt: skip
    m = map_steering(tiny_model, mapper, HOOK, 0.5, "all")
    assert m.norm is None and m.describe()["alpha"] == 0.5
    steered_generate(tiny_model, PROMPTS[:1], m, max_new_tokens=2)
    assert m.describe()["applied_norm"] > 0  # what the map actually moved, per token


# ---------------------------------------------------------------- random controls


def test_random_control_same_norm_different_direction_seeded(vector):
    c = random_control(vector, seed=0)
    assert c.shape == vector.shape and c.dtype == vector.dtype
    torch.testing.assert_close(c.norm(), vector.norm())
    assert not torch.allclose(c, vector)
    assert torch.equal(c, random_control(vector, seed=0))
    assert not torch.equal(c, random_control(vector, seed=1))


def test_covariance_directions_follow_the_covariance_at_the_given_norm():
    d = 16
    scales = torch.ones(d)
    scales[3] = 30.0  # one dimension carries nearly all the variance
    cov = torch.diag(scales**2)
    z = covariance_directions(cov, 200, norm=2.5, seed=0)
    assert z.shape == (200, d)
    torch.testing.assert_close(z.norm(dim=-1), torch.full((200,), 2.5))
    assert (z[:, 3].abs() / z.norm(dim=-1)).median() > 0.9  # isotropic draws: ~0.2
    assert torch.equal(z, covariance_directions(cov, 200, norm=2.5, seed=0))
    assert not torch.equal(z, covariance_directions(cov, 200, norm=2.5, seed=1))
    with pytest.raises(SteeringError, match="square"):
        covariance_directions(torch.ones(3, 4), 2, 1.0)
    with pytest.raises(SteeringError, match="no variance"):
        covariance_directions(torch.zeros(4, 4), 2, 1.0)


def test_a_sum_of_vectors_has_the_norm_of_its_whole_push(tiny_model, vector):
    """Per hook the vectors add (two at one hook: the norm of their sum, not of the parts); over
    hooks the squared norms add, as a multi-layer control vector's."""
    other = "blocks.0.hook_resid_post"
    a = vector_steering(tiny_model, HOOK, vector, 2.0)
    same = combined_steering(a, vector_steering(tiny_model, HOOK, -vector, 1.0))
    assert same.norm == pytest.approx(float(vector.norm()))
    layers = combined_steering(a, vector_steering(tiny_model, other, vector, 2.0))
    assert layers.norm == pytest.approx(math.sqrt(2) * 2.0 * float(vector.norm()))
    d = layers.describe()
    assert (d["kind"], d["hooks"], d["scale"], d["positions"]) == ("sum", [HOOK, other], 2.0, "all")
    assert combined_steering(a).norm == pytest.approx(a.norm)  # one layer is a one-part sum
