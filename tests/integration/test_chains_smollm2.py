"""Working backwards on SmolLM2: the shipped ' down' analogies, a PCA basis fit on the fly."""

from __future__ import annotations

import pytest
import torch

from analoglock.bases import PCABasis
from analoglock.cli.trace import prompts_path
from analoglock.data import load_documents
from analoglock.patching.backwards import TraceInputError, and_or, producing_prompts, rank_upstream

H = "blocks.15.hook_resid_post"


@pytest.mark.integration
def test_down_analogies_backwards(smollm2):
    m = smollm2
    docs = [d for d in load_documents(prompts_path("analogies")) if d.id.startswith("down/")]
    docs = [d for d in docs if d.id in ("down/opposites-1", "down/list-1", "down/left-right")]
    x = torch.cat([m.run_with_cache(d.text, names_filter=H)[1][H][0, 1:] for d in docs])
    basis = PCABasis(16, hook=H).fit(x)
    target = m.tokenizer.encode(" down", add_special_tokens=False)[0]
    tr = producing_prompts(m, basis, docs, target, progress=False)
    # left-right's greedy token is ' left': reported and dropped
    assert [d["id"] for d in tr.dropped] == ["down/left-right"]
    assert float(tr.clean_prob.min()) > 0.5
    ranked = rank_upstream(tr, basis, k=3, progress=False)
    assert ranked["agreement"]["sign_agreement_topk"] >= 2 / 3
    r = and_or(tr, basis, ranked["top"][:2].tolist(), n_random_pairs=4)
    assert r["class"] in ("AND-like", "OR-like", "distributed")
    with pytest.raises(TraceInputError, match="greedy"):
        producing_prompts(m, basis, docs[2:], target, progress=False)
