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


# --- intervals over held-out documents, and paired comparisons of two fits --------------------

CE_RUNS = ("clean", "spliced", "zero_ablation", "mean_ablation")
RATIOS = ("fvu", "ce_increase", "ce_recovered", "ce_recovered_vs_mean")


@pytest.fixture(scope="module")
def svd4(tiny_model, store_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("svd4")
    return out, fit_basis_on_store(store_dir, "svd", 4, out, model=tiny_model, splice_docs=4)


@pytest.fixture(scope="module")
def pca64(tiny_model, store_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pca64")
    return out, fit_basis_on_store(store_dir, "pca", 64, out, model=tiny_model, splice_docs=4)


def _recovered_bound(ce: dict[str, float], d: dict[str, float], base: str) -> float:
    """|error| of (B - S) / (B - C) when B, S, C are each off by at most d[...]."""
    b, s, c = ce[base], ce["spliced"], ce["clean"]
    return (d[base] + d["spliced"]) / abs(b - c) + abs(b - s) * (d[base] + d["clean"]) / (
        b - c
    ) ** 2


def _from_sums(per: dict, m: dict, store_dir) -> dict[str, tuple[float, float]]:
    """Per statistic: (its value from the per-document sums, a bound on its distance to the
    metrics.json value that the arithmetic of the two computations allows)."""
    from analoglock.bases.quality import heldout_ratio

    def value(key: str) -> float:
        num, den = heldout_ratio(per, key)
        return float(num.sum() / den.sum())

    # FVU: the same float32 reconstruction, float64 sums in another order; the metric's
    # denominator is sum||x||^2 - n||mean||^2, off by <= ~n * eps * sum||x||^2 / sum||x - mean||^2
    acts = ActivationStore(store_dir).load([HOOK])
    held = torch.isin(acts.doc, torch.tensor(per["fvu"]["doc_index"]))
    x = acts.acts[HOOK][held].double()
    assert sum(per["fvu"]["n_rows"]) == len(x) == m["n_rows"]["heldout"]
    cond = float(x.pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    fvu_tol = 4 * len(x) * torch.finfo(torch.float64).eps * cond * abs(m["heldout/fvu"])
    # CE: metrics.json sums float32 NLLs (>= 0) per batch: off by <= n * 2^-24 of the sum
    n = sum(per["ce"]["n_tokens"])
    ce = {r: sum(per["ce"][f"{r}_nll_sum"]) / n for r in CE_RUNS}
    d = {r: ce[r] * n * 2**-24 for r in CE_RUNS}
    out = {f"{r}_ce": (ce[r], d[r]) for r in CE_RUNS}
    out["fvu"] = (value("fvu"), fvu_tol)
    out["ce_increase"] = (value("ce_increase"), d["spliced"] + d["clean"])
    out["ce_recovered"] = (value("ce_recovered"), _recovered_bound(ce, d, "zero_ablation"))
    out["ce_recovered_vs_mean"] = (
        value("ce_recovered_vs_mean"),
        _recovered_bound(ce, d, "mean_ablation"),
    )
    return out


def test_per_document_sums_give_the_point_estimates(svd4, store_dir):
    from analoglock.bases.fit import PER_DOC_FILE

    out, m = svd4
    per = json.loads((out / PER_DOC_FILE).read_text())
    assert per["kind"] == "svd" and per["hook"] == HOOK and per["seed"] == 0
    assert len(per["fvu"]["doc_ids"]) == m["n_docs"]["heldout"]
    assert per["ce"]["doc_ids"] == per["fvu"]["doc_ids"][:4]  # the first 4 held-out documents
    for key, (value, bound) in _from_sums(per, m, store_dir).items():
        assert abs(value - m[f"heldout/{key}"]) <= bound, (key, value, m[f"heldout/{key}"], bound)


def test_intervals_over_documents_hold_the_point_and_say_how_many(svd4, store_dir):
    from analoglock.bases.fit import PER_DOC_FILE

    out, m = svd4
    sums = _from_sums(json.loads((out / PER_DOC_FILE).read_text()), m, store_dir)
    for key in RATIOS:
        lo, hi = m[f"heldout/{key}_ci95"]
        value, bound = sums[key]  # the interval's own estimate, and metrics.json's within bound
        assert lo <= value <= hi and hi - lo > 0, key
        assert lo - bound <= m[f"heldout/{key}"] <= hi + bound, key
    boot = m["heldout/bootstrap"]
    assert boot["n_boot"] == 1000 and boot["seed"] == 0 and boot["level"] == 0.95
    assert boot["n_docs"] == {"fvu": m["n_docs"]["heldout"], **dict.fromkeys(RATIOS[1:], 4)}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["heldout/fvu_ci95"] == m["heldout/fvu_ci95"] and saved["heldout/bootstrap"] == boot


def test_a_fit_paired_with_itself_differs_by_exactly_zero(svd4, tmp_path):
    import shutil

    from analoglock.bases.fit import PER_DOC_FILE, comparable_keys, paired_difference

    out, m = svd4
    assert comparable_keys(out, out) == list(RATIOS)
    # the same numbers with the documents listed in another order: pairing is by document id
    shuffled = tmp_path / "shuffled"
    shutil.copytree(out, shuffled)
    per = json.loads((shuffled / PER_DOC_FILE).read_text())
    for section in ("fvu", "ce"):
        n = len(per[section]["doc_ids"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
        assert order != list(range(n))
        per[section] = {k: [v[i] for i in order] if isinstance(v, list) else v for k, v in per[section].items()}  # fmt: skip
    (shuffled / PER_DOC_FILE).write_text(json.dumps(per))
    for other in (out, shuffled):
        for key in RATIOS:
            r = paired_difference(out, other, key)
            assert r["difference"] == 0.0 and r["ci95"] == [0.0, 0.0], (other, key)
            assert r["n_docs"] == (m["n_docs"]["heldout"] if key == "fvu" else 4)
            assert (
                r["value_a"] == r["value_b"]
            )  # vs metrics.json: see test_per_document_sums_give_the_point_estimates


def test_paired_difference_of_two_bases(svd4, pca64):
    from analoglock.bases.fit import paired_difference

    (a, ma), (b, mb) = svd4, pca64
    r = paired_difference(a, b, "heldout/fvu")
    assert r["difference"] == pytest.approx(ma["heldout/fvu"] - mb["heldout/fvu"], rel=1e-9)
    assert 0 < r["ci95"][0] < r["difference"] < r["ci95"][1]  # full-rank PCA loses nothing
    assert r["key"] == "heldout/fvu" and r["a"] == str(a) and r["b"] == str(b)
    r = paired_difference(a, b, "ce_increase", n_boot=200, seed=1)
    assert r["ci95"][0] < r["difference"] < r["ci95"][1] and r["n_boot"] == 200
    flipped = paired_difference(b, a, "ce_increase", n_boot=200, seed=1)
    assert flipped["difference"] == -r["difference"]
    assert flipped["ci95"] == pytest.approx([-r["ci95"][1], -r["ci95"][0]], abs=1e-12)


def test_paired_difference_refuses_other_documents(tiny_model, store_dir, svd4, tmp_path):
    import re

    from analoglock.bases.fit import paired_difference

    a = svd4[0]
    other_seed = tmp_path / "seed1"
    fit_basis_on_store(store_dir, "pca", 4, other_seed, seed=1)  # other held-out documents
    both = rf"{re.escape(str(a))} and {re.escape(str(other_seed))} measured 'fvu' on different held-out documents"  # fmt: skip
    with pytest.raises(ValueError, match=both):
        paired_difference(a, other_seed, "fvu")
    with pytest.raises(ValueError, match=r"no per-document 'ce' numbers"):
        paired_difference(a, other_seed, "ce_increase")  # fit without a model: no spliced CE
    fewer = tmp_path / "fewer"
    fit_basis_on_store(store_dir, "pca", 4, fewer, model=tiny_model, splice_docs=2)
    assert paired_difference(a, fewer, "fvu")["n_docs"] > 4  # same split: FVU pairs
    with pytest.raises(ValueError, match=r"'ce' on different held-out documents \(4 vs 2"):
        paired_difference(a, fewer, "ce_recovered")
    with pytest.raises(FileNotFoundError, match="heldout_per_doc.json"):
        paired_difference(a, tmp_path, "fvu")
    with pytest.raises(KeyError, match="ce_increase"):
        paired_difference(a, a, "l0")


def test_a_saved_basis_measured_on_its_own_harvest_repeats_its_fit(tiny_model, store_dir, svd4, tmp_path):  # fmt: skip
    """evaluate_basis_on_store on the fit's own harvest and split gives the fit's held-out numbers,
    so a basis fit elsewhere (the corpus SAE) pairs with bases fit on the harvest it is measured on."""
    from analoglock.bases.fit import evaluate_basis_on_store, paired_difference

    out, m = svd4
    e = evaluate_basis_on_store(out, store_dir, tmp_path / "eval", model=tiny_model, splice_docs=4)
    for key in ("heldout/fvu", "heldout/l0", "heldout/ce_increase", "heldout/ce_recovered_vs_mean"):
        assert e[key] == pytest.approx(m[key], rel=1e-6, abs=1e-9), key
    assert e["n_docs"] == m["n_docs"] and e["evaluated_basis"] == str(out)
    assert not (tmp_path / "eval" / "basis.safetensors").exists()  # measured, not copied
    r = paired_difference(tmp_path / "eval", out, "ce_increase")
    assert r["difference"] == pytest.approx(0.0, abs=1e-9) and r["n_docs"] == 4


def test_measuring_a_basis_on_another_hook_or_model_is_refused(tiny_model, store_dir, svd4, tmp_path):  # fmt: skip
    from analoglock.bases import BasisArtifactError, load_basis
    from analoglock.bases.fit import evaluate_basis_on_store
    from analoglock.model import model_info

    basis = load_basis(svd4[0])
    basis.hook = "blocks.0.hook_resid_post"
    basis.save(tmp_path / "l0", model=model_info(tiny_model).to_dict())
    with pytest.raises(Exception, match="blocks.0.hook_resid_post"):  # the harvest lacks the hook
        evaluate_basis_on_store(tmp_path / "l0", store_dir, tmp_path / "e1")
    basis.hook = HOOK
    basis.save(tmp_path / "other", model={**model_info(tiny_model).to_dict(), "sha256": "c" * 64})
    with pytest.raises(BasisArtifactError, match="fit on model"):
        evaluate_basis_on_store(tmp_path / "other", store_dir, tmp_path / "e2")
    cca = tmp_path / "cca"
    fit_basis_on_store(store_dir, "cca", 4, cca)
    with pytest.raises(ValueError, match="CCA basis"):
        evaluate_basis_on_store(cca, store_dir, tmp_path / "e3")
    assert not any((tmp_path / e).exists() for e in ("e1", "e2", "e3"))
