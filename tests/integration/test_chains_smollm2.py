"""Working backwards on SmolLM2: the shipped ' down' analogies, a PCA basis fit on the fly."""

from __future__ import annotations

import pytest
import torch

from analoglock.cli.trace import prompts_path
from analoglock.data import Document, load_documents
from analoglock.patching.backwards import (
    TraceInputError,
    and_or,
    classify,
    group_ablation,
    producing_prompts,
    rank_upstream,
)
from tests.helpers import LineBasis, fit_pca, last_residual, orthonormal_to

H = "blocks.15.hook_resid_post"


@pytest.mark.integration
def test_down_analogies_backwards(smollm2):
    m = smollm2
    docs = [d for d in load_documents(prompts_path("analogies")) if d.id.startswith("down/")]
    docs = [d for d in docs if d.id in ("down/opposites-1", "down/list-1", "down/left-right")]
    x = torch.cat([m.run_with_cache(d.text, names_filter=H)[1][H][0, 1:] for d in docs])
    basis = fit_pca(x, 16, H)
    target = m.tokenizer.encode(" down", add_special_tokens=False)[0]
    tr = producing_prompts(m, basis, docs, target, progress=False)
    # left-right's greedy token is ' left': reported and dropped
    assert [d["id"] for d in tr.dropped] == ["down/left-right"]
    assert float(tr.clean_prob.min()) > 0.5
    ranked = rank_upstream(tr, basis, k=3, progress=False)
    assert ranked["agreement"]["sign_agreement_topk"] >= 2 / 3
    top = ranked["top"][:2].tolist()
    r = and_or(tr, basis, top, n_random_pairs=4)
    # every reported drop is the measured fall of p(target), and the class follows from them
    _, prob = group_ablation(tr, basis, [[], [top[0]], top])
    assert r["single"][0]["drop"] == pytest.approx(float((1 - prob[1] / prob[0]).mean()), abs=2e-4)
    assert r["pairs"][0]["drop"] == pytest.approx(float((1 - prob[2] / prob[0]).mean()), abs=2e-4)
    single = {e["feature"]: e["drop"] for e in r["single"]}
    assert r["class"] == classify(single, {tuple(top): r["pairs"][0]["drop"]})["class"]
    with pytest.raises(TraceInputError, match="greedy"):
        producing_prompts(m, basis, docs[2:], target, progress=False)


@pytest.mark.integration
def test_and_built_by_construction_is_found_on_smollm2(smollm2):
    """A feature holding the whole last residual is a single killer: ablating it leaves the final
    norm nothing, so p(' down') falls to the unembedding bias's value (AND-like); two features
    holding half each kill only together, since the final norm is scale-invariant (OR-like)."""
    m = smollm2
    doc = next(d for d in load_documents(prompts_path("analogies")) if d.id == "down/opposites-1")
    hook, x = last_residual(m, doc.text)
    u = x / x.norm()
    target = m.tokenizer.encode(" down", add_special_tokens=False)[0]
    other = orthonormal_to(u, 2)
    for weights, expected in (([1.0], "AND-like"), ([0.5, 0.5], "OR-like")):
        dirs = torch.cat([u.expand(len(weights), -1), other])
        basis = LineBasis(dirs, [*weights, 1.0, 1.0], hook)
        tr = producing_prompts(m, basis, [Document(doc.id, doc.text)], target, progress=False)
        r = and_or(tr, basis, list(range(len(weights) + 1)), n_random_pairs=1)
        assert r["class"] == expected
