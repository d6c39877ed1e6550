"""Fitting a basis on a stored harvest: held-out documents, spliced loss, saved artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from analoglock.activation_store import ActivationStore, IncompleteHarvestError
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
    assert m["heldout/ce_recovered_vs_mean"] == pytest.approx(1.0, abs=1e-3)
    assert m["split"] == "all"  # a harvest of the test split alone: nothing to keep out
    assert json.loads((tmp_path / "pca" / "metrics.json").read_text())["hook"] == HOOK
    assert load_basis(tmp_path / "pca").n_features == 64


def test_small_basis_loses_information(tiny_model, store_dir, tmp_path):
    m = fit_basis_on_store(store_dir, "svd", 4, tmp_path / "svd", model=tiny_model, splice_docs=4)
    assert m["heldout/fvu"] > 0.05 and m["heldout/ce_recovered"] < 1.0
    assert m["heldout/ce_recovered_vs_mean"] < m["heldout/ce_recovered"]  # the harder bar
    assert m["heldout/mean_ablation_ce"] < m["heldout/zero_ablation_ce"]
    cca = fit_basis_on_store(store_dir, "cca", 4, tmp_path / "cca")
    assert len(cca["heldout/canonical_correlations"]) == 4
    assert cca["n_pairs"]["heldout"] >= 3 and len(cca["canonical_correlations_in_sample"]) == 4


def test_other_model_is_refused(store_dir, tmp_path):
    from analoglock.model import load_model
    from tests.helpers import tiny_model_dir

    other = load_model(str(tiny_model_dir(tmp_path / "m", seed=7)))
    with pytest.raises(ValueError, match="same model"):
        fit_basis_on_store(store_dir, "pca", 8, tmp_path / "x", model=other, splice_docs=2)


# --- which rows a basis sees, and what it refuses --------------------------------------------


@pytest.fixture(scope="module")
def pair_store(tiny_model, tmp_path_factory):
    """fable_work stories of every split (a lock's train/validation/test), both sides."""
    docs = [d for d in load_documents("fable_work") if int(d.meta["pair"].split("/")[1]) < 40]
    out = tmp_path_factory.mktemp("pairs")
    harvest_to_disk(tiny_model, docs, [HOOK], out, dataset="fable_work", progress=False)
    return out


def test_pair_harvest_is_fit_on_the_train_split_only(pair_store, tmp_path):
    docs = ActivationStore(pair_store).docs()
    n_train = sum(d.meta["split"] == "train" for d in docs)
    m = fit_basis_on_store(pair_store, "pca", 8, tmp_path / "pca")  # split=auto
    assert m["split"] == "train" and m["n_docs"] == {"fit": n_train, "heldout": len(docs) - n_train}
    every = fit_basis_on_store(pair_store, "pca", 8, tmp_path / "all", split="all")
    assert every["split"] == "all" and every["n_docs"]["fit"] == round(0.8 * len(docs))


def test_cca_control_is_deranged_within_views_and_scored_per_view(pair_store, tmp_path):
    m = fit_basis_on_store(pair_store, "cca", 3, tmp_path / "cca")
    assert m["fit_split"] == "train" and "within each view" in m["control"]
    views = m["heldout/by_view"]
    assert set(views) == {"story", "roles"}
    assert views["story"]["n_pairs"] + views["roles"]["n_pairs"] == m["n_pairs"]["heldout"]
    for v in views.values():
        assert len(v["canonical_correlations"]) == len(v["shuffled_control"]) == 3


def test_derangement_within_views_never_crosses_views():
    from analoglock.stats import derange_within

    views = ["story"] * 5 + ["roles"] * 7
    perm = derange_within(views, torch.Generator().manual_seed(0))
    assert all(views[int(p)] == views[i] for i, p in enumerate(perm))
    assert not (perm == torch.arange(len(views))).any()


def test_incomplete_harvest_is_refused_unless_allowed(tiny_model, tmp_path, monkeypatch):
    from tests.helpers import interrupted_harvest

    docs = load_documents("fable_work", split="validation")
    interrupted_harvest(monkeypatch, tiny_model, docs, [HOOK], tmp_path / "h", 3, batch_tokens=512, shard_rows=1)  # fmt: skip
    with pytest.raises(IncompleteHarvestError, match="batches 2 to .*resumes after batch 2"):
        fit_basis_on_store(tmp_path / "h", "pca", 4, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    m = fit_basis_on_store(tmp_path / "h", "pca", 4, tmp_path / "b", allow_incomplete=True)
    assert m["n_rows"]["train"] + m["n_rows"]["heldout"] == len(ActivationStore(tmp_path / "h"))


def test_nan_rows_and_file_out_dir_are_named(store_dir, tmp_path):
    from analoglock.bases import PCABasis
    from analoglock.bases.fit import check_finite_rows

    acts = ActivationStore(store_dir).load()
    x = acts.acts[HOOK].clone()
    x[5, 3] = float("nan")
    doc = acts.docs[int(acts.doc[5])].id
    with pytest.raises(FloatingPointError, match=rf"row 5, document {doc!r}, token {int(acts.pos[5])}"):  # fmt: skip
        check_finite_rows(x, acts, HOOK)
    with pytest.raises(FloatingPointError, match="first: row 5"):
        PCABasis(4).fit(x)  # any basis, called directly, also refuses
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        fit_basis_on_store(store_dir, "pca", 4, tmp_path / "file")


def test_cli_refuses_before_loading_the_model(store_dir, tmp_path):
    """An incomplete harvest or a file out_dir fails before the (nonexistent) model is loaded."""
    from analoglock.cli.fit_basis import main
    from tests.helpers import compose_cli

    (tmp_path / "file").write_text("x")
    overrides = [f"acts={store_dir}", f"out_dir={tmp_path / 'file'}", "model=hf", "model.spec=/no/model"]  # fmt: skip
    with pytest.raises(NotADirectoryError):
        main.__wrapped__(compose_cli("fit_basis", overrides))
    overrides[:2] = [f"acts={tmp_path / 'none'}", f"out_dir={tmp_path / 'out'}"]
    with pytest.raises(FileNotFoundError, match="not a harvest directory"):
        main.__wrapped__(compose_cli("fit_basis", overrides))
