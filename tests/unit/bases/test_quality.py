"""Spliced cross-entropy on the tiny model: identity costs nothing, zero recovers nothing."""

from __future__ import annotations

import pytest
import torch

from analoglock.bases.quality import next_token_ce, splice_quality
from analoglock.data import load_documents

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def docs():
    return load_documents("fable_work", split="test", limit=6)


def test_identity_and_zero_splices(tiny_model, docs):
    q = splice_quality(tiny_model, docs, HOOK, lambda x: x)
    assert q["ce_increase"] == pytest.approx(0.0, abs=1e-5)
    assert q["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    z = splice_quality(tiny_model, docs, HOOK, torch.zeros_like)
    assert z["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert z["zero_ablation_ce"] != pytest.approx(z["clean_ce"], abs=1e-3)


def test_clean_ce_matches_hand_computation(tiny_model, docs):
    doc = docs[0]
    toks = tiny_model.to_tokens(doc.text)
    with torch.no_grad():
        logits = tiny_model(toks)
    ref = torch.nn.functional.cross_entropy(logits[0, :-1], toks[0, 1:])
    assert next_token_ce(tiny_model, [doc]) == pytest.approx(float(ref), rel=1e-4)


def test_noise_splice_costs_loss(tiny_model, docs):
    gen = torch.Generator().manual_seed(0)
    q = splice_quality(
        tiny_model, docs, HOOK, lambda x: x + 0.5 * x.std() * torch.randn(x.shape, generator=gen)
    )
    assert q["ce_increase"] > 0 and q["ce_recovered"] < 1
