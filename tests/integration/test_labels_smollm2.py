"""SmolLM2 labels a few PCA features of a small harvest; detection numbers are well formed.

Whether labels beat their shuffled control is a measurement on the real model, not a test.
"""

from __future__ import annotations

from analoglock.activations import harvest
from analoglock.bases import PCABasis
from analoglock.bases.labels import MAX_LABEL_CHARS, MAX_LABEL_WORDS, label_features
from analoglock.data import load_documents

HOOK = "blocks.15.hook_resid_post"


def test_smollm2_labels_pca_features(smollm2):
    docs = load_documents("fable_work", split="train")[:16]
    acts = harvest(smollm2, docs, [HOOK], progress=False)  # every token
    basis = PCABasis(4, hook=HOOK).fit(acts.acts[HOOK])
    out = label_features(smollm2, basis, acts, [0, 1], n_explain=4, n_detect=3, progress=False)
    assert sorted(out) == [0, 1]
    for f, e in out.items():
        label = e["label"]
        assert label.strip() and e["source"] in ("model", "marked words"), e
        assert len(label.split()) <= MAX_LABEL_WORDS and len(label) <= MAX_LABEL_CHARS
        assert e["control"]["from"] != f
        for arm in (e["detection"], e["control"]):
            assert 0.0 <= arm["auroc"] <= 1.0 and 0.0 <= arm["accuracy"] <= 1.0
            assert arm["n"] == 6
