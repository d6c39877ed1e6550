"""Patching on the real SmolLM2: the block rerun, TransformerLens parity, the first-order limit."""

from __future__ import annotations

import pytest
import torch

from analoglock.bases import PCABasis
from analoglock.data import Document
from analoglock.patching import (
    Ablate,
    IdentityBasis,
    Patch,
    Segment,
    TokenLogits,
    attribution_effects,
    build_prompts,
    clean_runs,
    exact_effects,
    position_effects,
)
from analoglock.positions import AllTokens, LastToken

DOCS = [
    Document("a", "At dawn the lion crept down to the river to drink."),
    Document("b", "The tortoise and the hare agreed to run a race."),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_rerun_equals_full_forward_and_attribution_is_first_order(smollm2):
    seg = Segment(smollm2, "blocks.6.hook_resid_post", "blocks.12.hook_resid_post")
    runs = clean_runs(seg, build_prompts(smollm2, DOCS), progress=False)
    r = runs[0]
    delta = torch.randn(2, *r.x1.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(seg.run(r, delta), seg.run_full(r.ids, delta), atol=1e-3, rtol=1e-4)  # fmt: skip
    U = PCABasis(8, hook=seg.h1.name).fit(torch.cat([c.x1[1:] for c in runs]))
    V = PCABasis(8, hook=seg.h2.name).fit(torch.cat([c.x2[1:] for c in runs]))
    small = exact_effects(seg, runs, U, V, Ablate(1e-2), upstream_ids=[0, 1, 2], progress=False)
    A = attribution_effects(seg, runs, U, V, Ablate(1.0), upstream_ids=[0, 1, 2], progress=False)
    assert (small.effect / 1e-2 - A.effect).abs().max() < 0.05 * A.effect.abs().max()


def test_matches_transformer_lens_resid_pre_patching(smollm2):
    import pandas as pd
    from transformer_lens.patching import generic_activation_patch, layer_pos_patch_setter

    clean_docs = [Document("c", "The lion and the")]
    corrupt_docs = [Document("x", "The tiger and the")]
    prompts = build_prompts(smollm2, corrupt_docs, AllTokens(include_bos=True), LastToken(), sources=clean_docs)  # fmt: skip
    lion, tiger = (smollm2.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" lion", " tiger"))  # fmt: skip
    corrupted, clean = prompts[0].ids[None], prompts[0].source_ids[None]

    def metric(logits):
        return (logits[:, -1, lion] - logits[:, -1, tiger]).mean()

    # TransformerLens's own resid_pre patching (get_act_patch_resid_pre restricted through its
    # index_df) at the first, a middle and the last block: every position of each. Three layers
    # cover the three kinds of segment (from the embedding, mid-stack, one block to the unembed).
    layers, n_pos = [0, smollm2.cfg.n_layers // 2, smollm2.cfg.n_layers - 1], corrupted.shape[1]
    index = pd.DataFrame([(lay, pos) for lay in layers for pos in range(n_pos)], columns=["layer", "pos"])  # fmt: skip
    _, cache = smollm2.run_with_cache(clean)
    theirs = generic_activation_patch(
        smollm2, corrupted, cache, metric, layer_pos_patch_setter, "resid_pre", index_df=index
    ).reshape(len(layers), n_pos)
    unpatched = metric(smollm2(corrupted))
    V = TokenLogits(smollm2, [lion, tiger])
    ours = torch.zeros_like(theirs)
    for i, layer in enumerate(layers):
        seg = Segment(smollm2, f"blocks.{layer}.hook_resid_pre", V.hook)
        runs = clean_runs(seg, prompts, progress=False)
        e = position_effects(seg, runs, IdentityBasis(smollm2.cfg.d_model, hook=seg.h1.name), V, Patch())  # fmt: skip
        ours[i] = e[:, 0] - e[:, 1] + unpatched
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)
    assert (theirs - unpatched).abs().max() > 0.2  # the patch moves the metric: not 0 == 0
