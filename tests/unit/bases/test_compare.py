"""Few-vs-many decomposition and matching of two bases, against planted structure and controls."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from analoglock.bases import PCABasis, SVDBasis
from analoglock.bases.compare import children_of, compare_bases, decompose


def planted(seed: int = 0, d: int = 32):
    """4 orthonormal 'general' directions; 12 'specific' ones, each a mix of one or two of them."""
    g = torch.Generator().manual_seed(seed)
    few = torch.linalg.qr(torch.randn(d, 4, generator=g))[0].T  # [4, d]
    parents = [(i % 4, (i + 1) % 4 if i >= 8 else None) for i in range(12)]
    many = []
    for p, q in parents:
        v = few[p] * 2.0 + (few[q] if q is not None else 0) + 0.05 * torch.randn(d, generator=g)
        many.append(v)
    return few, torch.stack(many), parents


def test_decomposition_finds_planted_parents_and_beats_random_control():
    few, many, parents = planted()
    dec = decompose(few, many, l1=0.01, steps=800)
    assert dec["built_from_few"].all()
    assert (dec["explained"] > 0.97).all()  # noise of norm ~0.28 on a norm-2 direction
    assert dec["explained_control"].mean() < 0.6  # 4 of 32 dims: ~sqrt(4/32) = 0.35 by chance
    kids = children_of(dec["coefs"], dec["built_from_few"])
    for j, (p, _) in enumerate(parents):
        assert j in [k for k, _ in kids[p]]  # strongest parent = the one mixed in twice as strongly
    strong = (dec["coefs"].abs() > 0.2).sum(-1)  # noise leaks tiny weights onto the other parents
    assert (strong[8:] == 2).all() and (strong[:8] == 1).all()


def test_compare_bases_on_fitted_bases_and_cli(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g) @ torch.randn(8, 24, generator=g)
    svd = SVDBasis(4, hook="h").fit(x)
    pca = PCABasis(8, hook="h").fit(x)
    res = compare_bases(svd, pca)
    # PCA's top directions are the SVD's (up to centring): matching is near perfect, the control is not.
    assert res["matching"]["mean"] > res["matching_random_control"]["mean"] + 0.3
    with pytest.raises(ValueError, match="narrower"):
        compare_bases(pca, svd)
    svd.save(tmp_path / "svd", model={"sha256": "abc", "spec": "m"})
    pca.save(tmp_path / "pca", model={"sha256": "abc", "spec": "m"})
    from analoglock.cli.compare_bases import main
    from tests.helpers import compose_cli

    overrides = [f"few={tmp_path / 'svd'}", f"many={tmp_path / 'pca'}", f"out_dir={tmp_path / 'out'}"]  # fmt: skip
    main.__wrapped__(compose_cli("compare_bases", overrides))
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["n_features"] == {"few": 4, "many": 8}
    assert (tmp_path / "out" / "compare.html").stat().st_size > 10_000
    other = PCABasis(8, hook="h").fit(x)
    other.save(tmp_path / "other", model={"sha256": "xyz", "spec": "other"})
    from analoglock.bases import BasisArtifactError

    cfg = compose_cli("compare_bases", [f"few={tmp_path / 'svd'}", f"many={tmp_path / 'other'}"])
    with pytest.raises(BasisArtifactError, match="fit on model"):
        main.__wrapped__(cfg)


def test_unit_directions_are_unit():
    from analoglock.bases.compare import control_directions

    d = control_directions(10, 7, seed=1)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(10))
    torch.testing.assert_close(d, control_directions(10, 7, seed=1))  # seeded
    assert F.cosine_similarity(d[0], control_directions(10, 7, seed=2)[0], dim=0) < 0.999
