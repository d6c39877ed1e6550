"""Steering measures on the tiny random Llama, each against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from analoglock.generation import encode_prompts
from analoglock.lock.steering import (
    RoleItem,
    chance_mrr,
    continuation_perplexity,
    cosine_ranks,
    distinct_n,
    domain_mass,
    domain_vocab,
    has_loop,
    neutral_kl,
    neutral_kl_values,
    role_token_positions,
    role_transfer_ranks,
    vector_steering,
)
from analoglock.tokens import encode_texts

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["Once upon a time, a tortoise and a hare", "A fox saw some grapes"]
NEUTRAL = ["The train leaves at nine.", "Water boils at one hundred degrees."]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vector():
    return torch.randn(64, generator=torch.Generator().manual_seed(1))


def test_neutral_kl_zero_unsteered_or_at_scale_zero_positive_with_a_large_vector(
    tiny_model, vector
):
    assert neutral_kl(tiny_model, NEUTRAL, None) == 0.0
    assert neutral_kl(tiny_model, NEUTRAL, vector_steering(tiny_model, HOOK, vector, 0.0)) == 0.0
    assert neutral_kl(tiny_model, NEUTRAL, vector_steering(tiny_model, HOOK, vector, 20.0)) > 1e-3


def test_neutral_kl_values_per_prompt(tiny_model, vector):
    zero = neutral_kl_values(tiny_model, NEUTRAL, vector_steering(tiny_model, HOOK, vector, 0.0))
    assert torch.equal(zero, torch.zeros(2))
    big = vector_steering(tiny_model, HOOK, vector, 20.0, "all")
    values = neutral_kl_values(tiny_model, NEUTRAL, big)
    assert values.shape == (2,) and (values > 1e-3).all()
    # "all" adds at every token but the BOS: by hand, one unpadded prompt at a time.
    for k, ids in enumerate(encode_texts(tiny_model, NEUTRAL)):
        x = torch.tensor([ids])
        logp = torch.log_softmax(tiny_model(x)[0].float(), -1)
        with tiny_model.hooks(fwd_hooks=[(HOOK, _skip_bos(vector, 20.0))]):
            logq = torch.log_softmax(tiny_model(x)[0].float(), -1)
        expected = (logp.exp() * (logp - logq)).sum(-1).mean()
        assert float(values[k]) == pytest.approx(float(expected), rel=1e-4)
    roles = vector_steering(tiny_model, HOOK, vector, 20.0, "roles")
    assert torch.equal(neutral_kl_values(tiny_model, NEUTRAL, roles), torch.zeros(2))


def _skip_bos(vector, scale):
    def fn(x, hook=None):
        out = x.clone()
        out[:, 1:] += scale * vector
        return out

    return fn


def test_continuation_perplexity_matches_hand_computation(tiny_model):
    conts = [[500, 600, 700, 800], [900, 1000]]  # different lengths: padding must not matter
    ppl = continuation_perplexity(tiny_model, conts)
    bos = tiny_model.tokenizer.bos_token_id
    for k, cont in enumerate(conts):
        logits = tiny_model(torch.tensor([[bos, *cont]]))[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        expected = torch.exp(-logp[torch.arange(len(cont)), torch.tensor(cont)].mean())
        torch.testing.assert_close(ppl[k], expected, rtol=1e-5, atol=1e-5)
    assert math.isnan(float(continuation_perplexity(tiny_model, [[]])[0]))


def test_domain_mass_matches_hand_computation(tiny_model, vector):
    vocab_a, vocab_b = torch.tensor([500, 501]), torch.tensor([700])
    cont = [900, 901, 902]
    prompt = encode_prompts(tiny_model, PROMPTS[:1])[0][0].tolist()
    x = torch.tensor([prompt + cont])
    for steering, hooks in (
        (None, []),
        (vector_steering(tiny_model, HOOK, vector, 5.0, "all"), [(HOOK, _skip_bos(vector, 5.0))]),
    ):
        got = domain_mass(tiny_model, PROMPTS[:1], [cont], vocab_a, vocab_b, steering)
        with tiny_model.hooks(fwd_hooks=hooks):
            p = torch.softmax(tiny_model(x)[0].float(), -1)[len(prompt) - 1 :]
        expected = (p[:, vocab_b].sum(-1) - p[:, vocab_a].sum(-1)).mean()
        torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-7)
    unsteered = domain_mass(tiny_model, PROMPTS[:1], [cont], vocab_a, vocab_b)
    assert not torch.equal(got, unsteered)  # the steered case above measured something else
    with pytest.raises(ValueError, match="role-position lists"):
        domain_mass(tiny_model, PROMPTS[:1], [cont], vocab_a, vocab_b, None, roles=[[1], [2]])


def test_distinct_n_and_loops():
    got = distinct_n([[1, 2, 3, 4], [5, 6, 5, 6, 5, 6], [7]])
    assert got[0] == 1.0 and got[1] == pytest.approx(2 / 5) and math.isnan(float(got[2]))
    loop = [1, 2, 3, 4] * 3  # the 4-gram 1 2 3 4 occurs three times
    twice = [1, 2, 3, 4, 9, 1, 2, 3, 4]  # twice is prose (names, set phrases), not a loop
    assert has_loop([loop, twice, list(range(20)), [1, 2]]).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_domain_vocab_picks_domain_words(tiny_model):
    a_texts = ["forest fox rabbit, the forest and the fox and the rabbit"] * 3
    b_texts = ["office manager deadline, the office and the manager and the deadline"] * 3
    a_ids, b_ids = domain_vocab(tiny_model, a_texts, b_texts)
    dec = tiny_model.tokenizer.decode
    a_words = {dec([int(i)]).strip() for i in a_ids}
    b_words = {dec([int(i)]).strip() for i in b_ids}
    assert {"forest", "fox", "rabbit"} <= a_words
    assert {"office", "manager", "deadline"} <= b_words
    assert not a_words & b_words
    assert "the" not in a_words | b_words and "and" not in a_words | b_words  # shared, not topical
    assert all(len(w) >= 3 for w in a_words | b_words)


def test_cosine_ranks():
    cands = torch.eye(3)
    emb = torch.tensor([[1.0, 0.2, 0.0], [1.0, 0.2, 0.0], [0.0, 0.0, 1.0]])
    ranks = cosine_ranks(emb, cands, [0, 1, None])
    assert ranks[:2].tolist() == [1.0, 2.0] and math.isnan(float(ranks[2]))
    assert chance_mrr([1]) == 1.0 and chance_mrr([2]) == pytest.approx(0.75)
    assert chance_mrr([2, 4]) == pytest.approx((0.75 + (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4) / 2)


def test_role_transfer_ranks_match_hand_computation(tiny_model, vector):
    tok = tiny_model.tokenizer
    cands = tuple(tok.encode(w, add_special_tokens=False)[0] for w in (" junior", " star", " boss"))
    items = [
        RoleItem("p/0", "A slow tortoise met a proud hare. The", "hare", "star salesperson",
                 ("tortoise", "hare"), cands[1], cands),
        RoleItem("p/1", "A slow tortoise raced. Then the", "tortoise", "junior analyst",
                 ("tortoise",), cands[0], cands),
    ]  # fmt: skip

    def by_hand(hook_fn=None):
        out = []
        for it in items:
            ids = torch.tensor([encode_texts(tiny_model, [it.prefix])[0]])
            hooks = [(HOOK, hook_fn(it))] if hook_fn else []
            with tiny_model.hooks(fwd_hooks=hooks):
                last = tiny_model(ids)[0, -1].float()
            out.append(1.0 + float((last[list(it.candidates)] > last[it.target]).sum()))
        return out

    assert role_transfer_ranks(tiny_model, items).tolist() == by_hand()
    s = vector_steering(tiny_model, HOOK, vector, 30.0, "roles")

    def at_roles(it):
        pos = list(role_token_positions(tiny_model, it.prefix, it.roles))

        def fn(x, hook=None):
            out = x.clone()
            out[:, pos] += 30.0 * vector
            return out

        return fn

    assert role_transfer_ranks(tiny_model, items, s).tolist() == by_hand(at_roles)
