"""Fitting a basis on a stored harvest: held-out documents, spliced loss, saved artifacts."""

from __future__ import annotations

import json

import pytest

from analoglock.activations import harvest_to_disk
from analoglock.bases import load_basis
from analoglock.bases.fit import fit_basis_on_store, split_documents
from analoglock.data import load_documents

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def store_dir(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("acts")
    harvest_to_disk(
        tiny_model, load_documents("fable_work", split="test"), [HOOK], out, progress=False
    )
    return out


def test_documents_are_held_out_whole():
    train, held = split_documents(10, 0.2, seed=0)
    assert int(held.sum()) == 2 and not (train & held).any() and (train | held).all()


def test_full_rank_pca_splices_losslessly(tiny_model, store_dir, tmp_path):
    m = fit_basis_on_store(store_dir, "pca", 64, tmp_path / "pca", model=tiny_model, splice_docs=4)
    assert m["heldout/fvu"] < 1e-4
    assert m["heldout/ce_increase"] == pytest.approx(0.0, abs=1e-3)
    assert json.loads((tmp_path / "pca" / "metrics.json").read_text())["hook"] == HOOK
    assert load_basis(tmp_path / "pca").n_features == 64


def test_small_basis_loses_information(tiny_model, store_dir, tmp_path):
    m = fit_basis_on_store(store_dir, "svd", 4, tmp_path / "svd", model=tiny_model, splice_docs=4)
    assert m["heldout/fvu"] > 0.05 and m["heldout/ce_recovered"] < 1.0
    cca = fit_basis_on_store(store_dir, "cca", 4, tmp_path / "cca")
    assert len(cca["heldout/canonical_correlations"]) == 4
    assert cca["n_pairs"]["heldout"] >= 3 and len(cca["canonical_correlations_in_sample"]) == 4


def test_other_model_is_refused(store_dir, tmp_path):
    from analoglock.model import load_model
    from tests.helpers import tiny_model_dir

    other = load_model(str(tiny_model_dir(tmp_path / "m", seed=7)))
    with pytest.raises(ValueError, match="same model"):
        fit_basis_on_store(store_dir, "pca", 8, tmp_path / "x", model=other, splice_docs=2)
