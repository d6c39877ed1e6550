"""Feature bases on synthetic data: exactness, explained variance, NMF signs, CCA, artifacts, matching."""

from __future__ import annotations

import pytest
import torch

from analoglock.bases import (
    BASES,
    BasisArtifactError,
    CCABasis,
    NMFBasis,
    PCABasis,
    SVDBasis,
    build_basis,
    decomposition_matrix,
    load_basis,
    match_features,
)
from analoglock.lock.maps.sparse import FeatureBasisLike, SparseFeatureMap

D = 12


def low_rank_data(n: int = 300, d: int = D, rank: int = 6, seed: int = 0, offset: float = 3.0):
    """Rows with decaying variance along `rank` axes, small noise, and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g) * torch.linspace(3.0, 0.5, rank)
    mix = torch.randn(rank, d, generator=g)
    return z @ mix + 0.05 * torch.randn(n, d, generator=g) + offset * torch.randn(d, generator=g)


def fitted(kind: str, k: int = 4, **kw):
    """A small fitted basis of each kind (CCA on two views of the same latent)."""
    x = low_rank_data()
    if kind == "cca":
        g = torch.Generator().manual_seed(1)
        x_b = x @ torch.randn(D, 10, generator=g) + 0.1 * torch.randn(len(x), 10, generator=g)
        return build_basis(kind, n_components=k, **kw).fit_pair(x, x_b), x
    return build_basis(kind, n_components=k, **kw).fit(x), x


def test_registry_and_errors(tmp_path):
    assert set(BASES) == {"svd", "pca", "nmf", "cca", "sae"}
    with pytest.raises(ValueError, match="Valid kinds: svd, pca, nmf, cca, sae"):
        build_basis("pcaa", n_components=2)
    with pytest.raises(BasisArtifactError, match="no cfg.json"):
        load_basis(tmp_path)
    (tmp_path / "cfg.json").write_text('{"kind": "transcoder"}')
    with pytest.raises(ValueError, match="Unknown basis kind 'transcoder'.*Valid kinds"):
        load_basis(tmp_path)
    with pytest.raises(RuntimeError, match="not fitted"):
        SVDBasis(2).encode(torch.zeros(D))
    with pytest.raises(TypeError, match="fit_pair"):
        CCABasis(2).fit(torch.zeros(5, D))


@pytest.mark.parametrize("cls", [SVDBasis, PCABasis])
def test_full_rank_reconstructs_exactly(cls):
    x = low_rank_data(n=50, rank=D)
    basis = cls(D).fit(x)
    torch.testing.assert_close(basis.decode(basis.encode(x)), x, atol=1e-4, rtol=1e-4)
    assert basis.quality(x)["fvu"] < 1e-8


def test_pca_fvu_matches_explained_variance_ratio():
    x = low_rank_data()
    for k in (1, 3, 5):
        basis = PCABasis(k).fit(x)
        expected = 1 - float(basis.explained_variance_ratio.sum())
        assert basis.quality(x)["fvu"] == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_svd_fvu_matches_energy_ratio_on_centred_data():
    x = low_rank_data()
    x = x - x.mean(0)  # on centred rows uncentred energy is variance
    for k in (1, 3, 5):
        basis = SVDBasis(k).fit(x)
        expected = 1 - float(basis.explained_energy_ratio.sum())
        assert basis.quality(x)["fvu"] == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_svd_keeps_the_mean_direction_uncentred():
    x = low_rank_data(offset=20.0)
    first = SVDBasis(1).fit(x).directions[0]
    cos = torch.nn.functional.cosine_similarity(first, x.mean(0), dim=0)
    assert cos.abs() > 0.95


def test_pca_mean_as_feature():
    x = low_rank_data()
    basis = PCABasis(3, mean_as_feature=True).fit(x)
    plain = PCABasis(3).fit(x)
    assert basis.n_features == 4 and basis.directions.shape == (4, D)
    torch.testing.assert_close(basis.directions[-1], x.mean(0), atol=1e-5, rtol=1e-5)
    # The mean is code (0, 0, 0, 1) and encodes back to it.
    mean_code = torch.tensor([0.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(basis.decode(mean_code), x.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(basis.encode(x.mean(0)), mean_code, atol=1e-4, rtol=1e-4)
    # On the fitted affine plane, the other codes are plain PCA's and the mean's code is 1.
    on_plane = plain.decode(torch.randn(20, 3))
    codes = basis.encode(on_plane)
    torch.testing.assert_close(codes[:, :3], plain.encode(on_plane), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(codes[:, 3], torch.ones(20), atol=1e-4, rtol=1e-4)
    # Projecting onto a larger space is never worse than plain PCA.
    assert basis.quality(x)["fvu"] <= plain.quality(x)["fvu"] + 1e-6


def test_nmf_non_negative_and_fvu_drops_with_more_features():
    x = low_rank_data()
    fvus = []
    for k in (2, 6, 12):
        basis = NMFBasis(k, seed=0).fit(x)
        assert (basis.dictionary >= 0).all()
        codes = basis.encode(x)
        assert codes.shape == (len(x), k) and (codes >= 0).all()
        fvus.append(basis.quality(x)["fvu"])
    assert fvus[0] > fvus[1] > fvus[2]
    assert fvus[2] < 0.1


def test_nmf_is_deterministic_for_a_seed():
    x = low_rank_data()
    a, b = NMFBasis(4, seed=3).fit(x), NMFBasis(4, seed=3).fit(x)
    torch.testing.assert_close(a.dictionary, b.dictionary, atol=0, rtol=0)


def test_cca_recovers_planted_shared_latent():
    g = torch.Generator().manual_seed(0)
    n = 2000
    shared = torch.randn(n, 1, generator=g)
    x_a = torch.randn(n, 8, generator=g) + 3 * shared @ torch.randn(1, 8, generator=g)
    x_b = torch.randn(n, 6, generator=g) + 3 * shared @ torch.randn(1, 6, generator=g)
    cca = CCABasis(2).fit_pair(x_a, x_b)
    assert cca.canonical_correlations[0] > 0.9
    assert cca.canonical_correlations[1] < 0.2
    # The first canonical variates of the two domains agree (up to a shared sign).
    z_a, z_b = cca.encode(x_a)[:, 0], cca.encode(x_b, domain="b")[:, 0]
    assert torch.corrcoef(torch.stack([z_a, z_b]))[0, 1] > 0.9
    assert cca.directions_b.shape == (2, 6)

    independent = CCABasis(1).fit_pair(
        torch.randn(n, 8, generator=g), torch.randn(n, 6, generator=g)
    )
    assert independent.canonical_correlations[0] < 0.15


def test_cca_overfits_in_sample_and_heldout_correlations_tell():
    from analoglock.bases.cca import variate_correlations

    g = torch.Generator().manual_seed(1)
    n, d = 60, 40  # few pairs in many dims: in-sample correlations are ~1 even for pure noise
    noise = CCABasis(3, ridge=0.0).fit_pair(
        torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    )
    assert noise.canonical_correlations[0] > 0.95
    held_a, held_b = torch.randn(200, d, generator=g), torch.randn(200, d, generator=g)
    assert variate_correlations(noise, held_a, held_b).abs().max() < 0.35
    # A planted shared latent survives on held-out pairs, and breaks when partners are shuffled.
    shared = torch.randn(260, 1, generator=g)
    mix_a, mix_b = torch.randn(1, d, generator=g), torch.randn(1, d, generator=g)
    x_a = torch.randn(260, d, generator=g) + 3 * shared @ mix_a
    x_b = torch.randn(260, d, generator=g) + 3 * shared @ mix_b
    cca = CCABasis(1, ridge=0.1).fit_pair(x_a[:60], x_b[:60])
    assert variate_correlations(cca, x_a[60:], x_b[60:])[0].abs() > 0.8
    perm = torch.randperm(200, generator=g)
    assert variate_correlations(cca, x_a[60:], x_b[60:][perm])[0].abs() < 0.3


def test_cca_full_rank_reconstructs_each_domain():
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(200, 5, generator=g), torch.randn(200, 5, generator=g)
    cca = CCABasis(5).fit_pair(x_a, x_b)
    for x, dom in ((x_a, "a"), (x_b, "b")):
        torch.testing.assert_close(cca.decode(cca.encode(x, dom), dom), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kind,kw",
    [("svd", {}), ("pca", {}), ("pca", {"mean_as_feature": True}), ("nmf", {}), ("cca", {})],
)
def test_save_load_round_trip(tmp_path, kind, kw):
    basis, x = fitted(kind, **kw)
    basis.hook = "blocks.1.hook_resid_pre"
    basis.save(tmp_path, model={"name": "tiny", "sha256": "abc"})
    cfg = __import__("json").loads((tmp_path / "cfg.json").read_text())
    assert cfg["kind"] == kind and cfg["model"]["name"] == "tiny" and cfg["d_model"] == D
    loaded = load_basis(tmp_path)
    assert type(loaded) is type(basis) and loaded.hook == basis.hook
    assert loaded.config() == basis.config() and loaded.n_features == basis.n_features
    codes = basis.encode(x)
    torch.testing.assert_close(loaded.encode(x), codes, atol=0, rtol=0)
    torch.testing.assert_close(loaded.decode(codes), basis.decode(codes), atol=0, rtol=0)
    other = "svd" if kind != "svd" else "pca"
    with pytest.raises(BasisArtifactError, match="not"):
        BASES[other].load(tmp_path)


def test_quality_keys_and_dead_features():
    basis, x = fitted("svd", k=4)
    q = basis.quality(x)
    assert set(q) == {"fvu", "mse", "l0", "dead_fraction"}
    assert q["l0"] == pytest.approx(4.0) and q["dead_fraction"] == 0.0
    nmf, _ = fitted("nmf", k=6)
    q = nmf.quality(torch.zeros(5, D))  # nothing to encode: every feature is dead
    assert q["l0"] == 0.0 and q["dead_fraction"] == 1.0


def test_quality_and_reconstruct_stream_in_chunks():
    """Chunks of 7 rows give the numbers of one pass (FVU centres on the whole set's mean)."""
    nmf, x = fitted("nmf", k=6)
    whole, chunked = nmf.quality(x, chunk=len(x)), nmf.quality(x, chunk=7)
    assert len(x) % 7 and whole == pytest.approx(chunked, rel=1e-6, abs=1e-9)
    assert 0 < whole["fvu"] < 1 and 0 < whole["l0"] <= 6
    torch.testing.assert_close(nmf.reconstruct(x, chunk=7), nmf.forward(x))
    sparse = nmf.quality(torch.cat([x, torch.zeros(9, D)]), chunk=4)  # dead = dead in every chunk
    assert sparse["dead_fraction"] == whole["dead_fraction"]


def test_match_recovers_permutation_and_signs():
    basis, _ = fitted("pca", k=6)
    dirs = basis.directions
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
    match = match_features(dirs, dirs[perm] * signs[:, None])
    inverse = torch.argsort(perm)
    assert torch.equal(match.pairs[:, 1], inverse)
    torch.testing.assert_close(match.abs_cosines, torch.ones(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(match.cosines, signs[inverse], atol=1e-5, rtol=0)
    s = match.summary()
    assert s["mean"] == pytest.approx(1.0, abs=1e-5) and s["frac_above_0.9"] == 1.0


def test_match_different_sizes():
    g = torch.Generator().manual_seed(0)
    big = torch.nn.functional.normalize(torch.randn(10, 32, generator=g), dim=-1)
    match = match_features(big[[7, 2, 5]], big)
    assert match.pairs.tolist() == [[0, 7], [1, 2], [2, 5]]
    assert len(match_features(big, big[[7, 2, 5]]).pairs) == 3


def test_decomposition_matrix_recovers_planted_sparse_combination():
    g = torch.Generator().manual_seed(0)
    few = torch.nn.functional.normalize(torch.randn(8, 64, generator=g), dim=-1)
    planted = torch.zeros(20, 8)
    for j in range(20):
        idx = torch.randperm(8, generator=g)[:2]
        planted[j, idx] = torch.tensor([1.0, -0.5]) * (1 + torch.rand(2, generator=g))
    c = decomposition_matrix(few, planted @ few, l1=1e-3, steps=2000)
    torch.testing.assert_close(c, planted, atol=0.02, rtol=0)
    assert ((c.abs() > 0.05) == (planted != 0)).all()


@pytest.mark.parametrize("kind", ["svd", "pca", "nmf", "cca"])
def test_protocol_and_identity_sparse_map_on_span(kind):
    kw = {"mean_as_feature": True} if kind == "pca" else {}
    basis, _ = fitted(kind, **kw)
    assert isinstance(basis, FeatureBasisLike)
    mapper = SparseFeatureMap(basis)
    codes = torch.rand(16, basis.n_features) + 0.1  # non-negative, so inside NMF's cone too
    x = basis.decode(codes)
    with torch.no_grad():
        torch.testing.assert_close(mapper(x), x, atol=1e-3, rtol=1e-3)


def test_cca_domain_views_map_a_to_b():
    basis, x = fitted("cca", k=4)
    view_a, view_b = basis.for_domain("a"), basis.for_domain("b")
    assert isinstance(view_a, FeatureBasisLike)
    mapper = SparseFeatureMap(view_a, view_b)
    with torch.no_grad():
        out = mapper(x[:5])
    torch.testing.assert_close(out, basis.decode(basis.encode(x[:5]), domain="b"))
    with pytest.raises(ValueError, match="domain"):
        basis.for_domain("c")
