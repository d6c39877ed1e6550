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


# --- per held-out document: the sums behind every number, and their bootstrap -----------------


def test_per_document_nll_adds_up_to_the_mean_and_matches_each_document_alone(tiny_model, docs):
    from analoglock.bases.quality import next_token_nll

    half = lambda x: 0.5 * x  # noqa: E731
    mean, nll, count = next_token_nll(tiny_model, docs, HOOK, half)
    assert mean == next_token_ce(tiny_model, docs, HOOK, half)  # the old number, bit for bit
    lengths = [min(len(tiny_model.to_tokens(d.text)[0]), 256) - 1 for d in docs]
    assert count.tolist() == lengths and len(set(lengths)) > 1  # a mix-up of documents would show
    # the mean sums float32 NLLs (>= 0) per batch: |error| <= n * 2^-24 * sum, the float64 one ~0
    n = int(count.sum())
    assert float(nll.sum() / count.sum()) == pytest.approx(mean, rel=n * 2**-24)
    for i, doc in enumerate(docs):  # each document's sum is its own, not its batch neighbour's
        _, alone, c = next_token_nll(tiny_model, [doc], HOOK, half)
        assert int(c) == lengths[i] and float(alone) == pytest.approx(float(nll[i]), rel=1e-4)


def test_fvu_per_document_sums_give_the_fvu_of_all_rows():
    from analoglock.bases.quality import FractionVarianceUnexplained, fvu_per_doc, heldout_ratio

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen) + 3.0  # a mean far from 0, as the residual stream's
    x_hat = x + 0.3 * torch.randn(300, 8, generator=gen)
    doc = torch.randint(5, (300,), generator=gen) * 2  # documents 0, 2, ..., 8: ids are kept
    per = fvu_per_doc(x, x_hat, doc, [f"d{i}" for i in range(10)])
    assert per["doc_ids"] == ["d0", "d2", "d4", "d6", "d8"] and sum(per["n_rows"]) == 300
    fvu = FractionVarianceUnexplained()
    fvu.update(x, x_hat)
    num, den = heldout_ratio({"fvu": per}, "fvu")
    # float64 sums of 300 terms; the metric's denominator subtracts sum||x||^2 - n||mean||^2:
    # relative error <= ~n * eps * sum||x||^2 / sum||x - mean||^2
    x64 = x.double()
    cond = float(x64.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())
    tol = 4 * 300 * torch.finfo(torch.float64).eps * cond
    assert float(num.sum() / den.sum()) == pytest.approx(float(fvu.compute()), rel=tol)
    # the mean is all rows', not each document's: a document's deviations do not sum to its own
    # centred sum of squares
    rows = doc == 0
    own = float((x64[rows] - x64[rows].mean(0)).pow(2).sum())
    assert per["sum_sq_dev"][0] > own


def test_heldout_intervals_are_ratios_of_resampled_document_sums():
    from analoglock.bases.quality import heldout_intervals

    per = {"fvu": {"doc_ids": list("abcd"), "sum_sq_err": [1.0, 2.0, 0.5, 4.0],
                   "sum_sq_dev": [4.0, 4.0, 5.0, 6.0]}}  # fmt: skip
    out = heldout_intervals(per, n_boot=500, seed=3)
    lo, hi = out["fvu_ci95"]
    assert lo < 7.5 / 19 < hi
    assert lo >= 0.5 / 5 and hi <= 4.0 / 6  # within the most extreme single-document ratios
    assert out["bootstrap"]["n_docs"] == {"fvu": 4} and out["bootstrap"]["n_boot"] == 500
    assert heldout_intervals(per, n_boot=500, seed=3) == out  # seeded
    one = {"fvu": {k: v[:1] for k, v in per["fvu"].items()}}
    assert heldout_intervals(one)["fvu_ci95"] == [0.25, 0.25]  # one document: no spread
    assert heldout_intervals({}) == {}
