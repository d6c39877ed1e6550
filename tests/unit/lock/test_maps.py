"""Mapping families: identity at init, exact round trips, inverses, closed forms, and fitting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from analoglock.lock.maps import (
    MAPPERS,
    AffineMap,
    FeatureBasisLike,
    LowRankMap,
    OrthogonalMap,
    SparseFeatureMap,
    TranslationMap,
    build_mapper,
    mapper_from_tensors,
)
from analoglock.lock.maps.baselines import (
    apply_affine,
    apply_orthogonal,
    least_squares_affine,
    mean_difference,
    procrustes,
)

D = 8  # d_model of every test map: small enough that all of this runs in about a second


class LinearBasis:
    """An orthonormal 'feature basis': encode = x Q, decode = c Q^T (perfect reconstruction)."""

    def __init__(self, Q: torch.Tensor):
        self.Q = Q
        self.n_features = Q.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes."""
        return x @ self.Q

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Activations."""
        return codes @ self.Q.T


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    """A random orthogonal matrix (QR of a Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g)).Q


def rotation_near_identity(d: int, seed: int, angle: float = 0.5) -> torch.Tensor:
    """A rotation reachable from I (det +1): exp of a scaled random skew matrix."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) * angle / d**0.5
    return torch.linalg.matrix_exp(A - A.T)


def make(kind: str) -> torch.nn.Module:
    """A fresh mapper of each kind at D."""
    if kind == "sparse":
        return build_mapper("sparse", basis_a=LinearBasis(random_orthogonal(D, 0)))
    if kind == "lowrank":
        return build_mapper("lowrank", d_model=D, rank=2)
    return build_mapper(kind, d_model=D)


def perturb(mapper: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter a little, so round trips are tested away from the init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in mapper.parameters():
            p.add_(0.1 * torch.randn_like(p))


def extra_for(kind: str, mapper) -> dict:
    """Non-tensor pieces mapper_from_tensors needs."""
    return {"basis_a": mapper.basis_a} if kind == "sparse" else {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny passes: threads only add contention


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, D)  # [batch, pos, d_model]: maps act on the last axis only


def test_registry_has_every_family():
    assert set(MAPPERS) == {"translation", "affine", "lowrank", "orthogonal", "sparse"}
    assert all(cls.kind == kind for kind, cls in MAPPERS.items())


@pytest.mark.parametrize("kind", ["translation", "affine", "lowrank", "orthogonal"])
def test_init_is_exact_identity(kind, x):
    assert torch.equal(make(kind)(x), x)


def test_sparse_identity_with_orthonormal_basis(x):
    mapper = make("sparse")
    assert torch.allclose(mapper(x), x, atol=1e-5)  # x Q Q^T: identity up to float rounding
    assert mapper.regularizers()["l1"].item() == 0.0  # the identity prior costs nothing


def test_sparse_keep_error_is_identity_with_lossy_basis(x):
    # A basis that spans only half the space: without the error term half of x is lost.
    basis = LinearBasis(random_orthogonal(D, 0)[:, : D // 2])
    assert not torch.allclose(SparseFeatureMap(basis)(x), x, atol=1e-2)
    assert torch.allclose(SparseFeatureMap(basis, keep_error=True)(x), x, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(MAPPERS))
def test_export_round_trip_is_exact(kind, x):
    mapper = make(kind)
    if kind == "orthogonal":
        mapper = OrthogonalMap.from_procrustes(torch.randn(32, D), torch.randn(32, D))
    perturb(mapper)
    cfg = json.loads(json.dumps(mapper.config()))  # must survive cfg.json
    tensors = st_load(st_save(mapper.export_tensors()))  # and safetensors
    loaded = mapper_from_tensors(kind, cfg, tensors, **extra_for(kind, mapper))
    assert type(loaded) is type(mapper)
    with torch.no_grad():
        assert torch.equal(loaded(x), mapper(x))
    assert torch.equal(loaded.param_vector(), mapper.param_vector())


def test_from_tensors_rejects_wrong_shapes():
    tensors = TranslationMap(D).export_tensors()
    with pytest.raises(ValueError, match="shape"):
        TranslationMap.from_tensors({"d_model": D + 1}, tensors)
    with pytest.raises(ValueError, match="missing"):
        AffineMap.from_tensors({"d_model": D}, {"W_map": torch.zeros(D, D)})


def test_sparse_from_tensors_needs_matching_basis():
    mapper = make("sparse")
    cfg, tensors = mapper.config(), mapper.export_tensors()
    with pytest.raises(ValueError, match="basis"):
        SparseFeatureMap.from_tensors(cfg, tensors)
    with pytest.raises(ValueError, match="features"):
        SparseFeatureMap.from_tensors(cfg, tensors, basis_a=LinearBasis(torch.eye(D)[:, :3]))


def test_orthogonal_stays_orthogonal_under_adam(x):
    mapper = OrthogonalMap(D)
    target = x.flip(-1) * 2.0  # not a rotation: the optimizer pulls hard away from the manifold
    opt = torch.optim.Adam(mapper.parameters(), lr=0.1)
    for _ in range(10):
        loss = (mapper(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    R = mapper.R.detach()
    assert (R - torch.eye(D)).abs().max() > 0.1  # it did move
    assert torch.allclose(R.T @ R, torch.eye(D), atol=1e-5)


def test_from_procrustes_recovers_rotation_and_shift():
    torch.manual_seed(2)
    R_true, shift = random_orthogonal(D, 3), torch.randn(D) * 3
    X_a = torch.randn(64, D) + 1.0
    X_b = X_a @ R_true + shift
    mapper = OrthogonalMap.from_procrustes(X_a, X_b)
    assert (mapper.R.detach() - R_true).abs().max() < 1e-4
    with torch.no_grad():
        assert (mapper(X_a) - X_b).abs().max() < 1e-4
        assert (mapper.inverse(X_b) - X_a).abs().max() < 1e-4
    R, mu_a, mu_b = procrustes(X_a, X_b)
    assert (apply_orthogonal(X_a, R, mu_a, mu_b) - X_b).abs().max() < 1e-4


def test_mean_difference_recovers_shift():
    torch.manual_seed(4)
    shift = torch.randn(D)
    X_a = torch.randn(50, D)
    assert torch.allclose(mean_difference(X_a, X_a + shift), shift, atol=1e-5)


def test_least_squares_affine_recovers_affine():
    torch.manual_seed(5)
    W_true, b_true = torch.randn(D, D), torch.randn(D)
    X_a = torch.randn(200, D)
    W, b = least_squares_affine(X_a, X_a @ W_true + b_true, ridge=1e-8)
    assert torch.allclose(W, W_true, atol=1e-4)
    assert torch.allclose(b, b_true, atol=1e-4)
    assert torch.allclose(apply_affine(X_a, W, b), X_a @ W_true + b_true, atol=1e-3)


def test_least_squares_ridge_keeps_unseen_directions():
    # Data spans only the first 3 axes (n << d_model, as with few story pairs): the ridge must
    # leave the other axes unchanged (identity prior), not collapse them to zero.
    torch.manual_seed(6)
    X_a = torch.zeros(20, D)
    X_a[:, :3] = torch.randn(20, 3)
    W, _ = least_squares_affine(X_a, X_a * 2.0)
    assert torch.allclose(W[3:, 3:], torch.eye(D - 3), atol=1e-6)
    assert torch.allclose(torch.diagonal(W)[:3], torch.full((3,), 2.0), atol=1e-2)


def test_lowrank_nuclear_matches_svd():
    mapper = LowRankMap(D, rank=3)
    perturb(mapper)
    expected = torch.linalg.svdvals(mapper.U @ mapper.V.T).sum()
    assert torch.allclose(mapper.regularizers()["nuclear"], expected, atol=1e-5)
    assert torch.allclose(mapper.regularizers()["l1"], mapper.U.abs().sum() + mapper.V.abs().sum())


def test_lowrank_nuclear_gradient_finite_at_init():
    mapper = LowRankMap(D, rank=3)  # U = 0: a QR backward through U would divide by zero
    mapper.regularizers()["nuclear"].backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in mapper.parameters())


def test_translation_relation_vector_and_inverse(x):
    mapper = TranslationMap(D)
    perturb(mapper)
    assert torch.equal(mapper.relation_vector(), mapper.r.detach())
    with torch.no_grad():
        assert torch.allclose(mapper.inverse(mapper(x)), x, atol=1e-6)


@pytest.mark.parametrize("kind", ["affine", "lowrank", "orthogonal"])
def test_inverse_undoes_forward(kind, x):
    mapper = make(kind)
    perturb(mapper)
    with torch.no_grad():
        assert torch.allclose(mapper.inverse(mapper(x)), x, atol=1e-5)
        assert torch.allclose(mapper(mapper.inverse(x)), x, atol=1e-5)


def test_sparse_has_no_inverse(x):
    with pytest.raises(NotImplementedError, match="no exact inverse"):
        make("sparse").inverse(x)


def test_relation_vector_needs_x_a_unless_translation(x):
    mapper = AffineMap(D)
    perturb(mapper)
    with pytest.raises(ValueError, match="pass x_a"):
        mapper.relation_vector()
    with torch.no_grad():
        expected = (mapper(x) - x).reshape(-1, D).mean(0)
        assert torch.allclose(mapper.relation_vector(x), expected)
        # Adding the vector is exact for a translation-shaped affine map (W_map = 0).
        mapper.W_map.zero_()
        assert torch.allclose(mapper.relation_vector(x), mapper.b_map)


def test_sparse_top_edges_and_offdiagonal_l1():
    mapper = SparseFeatureMap(LinearBasis(torch.eye(D)))
    with torch.no_grad():
        mapper.W_feat[2, 5] = -3.0
        mapper.W_feat[6, 1] = 2.0
    assert mapper.top_edges(2) == [(2, 5, -3.0), (6, 1, 2.0)]
    assert mapper.top_edges(3, include_diagonal=False)[:2] == [(2, 5, -3.0), (6, 1, 2.0)]
    assert mapper.regularizers()["l1"].item() == pytest.approx(5.0)
    assert isinstance(mapper.basis_a, FeatureBasisLike)
    assert list(dict(mapper.named_parameters())) == ["W_feat", "b_feat"]  # basis not trained


def _target(kind: str, mapper, X: torch.Tensor) -> torch.Tensor:
    """A synthetic target from the mapper's own family, well away from its init."""
    g = torch.Generator().manual_seed(7)
    if kind == "translation":
        return X + torch.randn(D, generator=g)
    if kind == "affine":
        return X + X @ (0.3 * torch.randn(D, D, generator=g)) + torch.randn(D, generator=g)
    if kind == "lowrank":
        U, V = torch.randn(D, 2, generator=g), torch.randn(D, 2, generator=g)
        return X + 0.3 * (X @ V) @ U.T
    if kind == "orthogonal":
        return X @ rotation_near_identity(D, 8)
    W = torch.eye(D) + 0.5 * torch.randn(D, D, generator=g) * (torch.rand(D, D, generator=g) < 0.2)
    return mapper.basis_b.decode(mapper.basis_a.encode(X) @ W)


@pytest.mark.parametrize("kind", sorted(MAPPERS))
def test_fits_its_own_family(kind):
    torch.manual_seed(9)
    mapper = make(kind)
    X = torch.randn(128, D)
    Y = _target(kind, mapper, X)
    opt = torch.optim.Adam(mapper.parameters(), lr=0.05)
    before = mapper.param_vector()
    losses = []
    for _ in range(300):
        loss = (mapper(X) - Y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    assert (mapper.param_vector() - before).norm() > 0  # param_vector sees the movement


def test_unknown_kind_lists_valid_kinds():
    for call in (
        lambda: build_mapper("rotation", d_model=D),
        lambda: mapper_from_tensors("rotation", {}, {}),
    ):
        with pytest.raises(ValueError, match="Valid kinds") as err:
            call()
        assert all(kind in str(err.value) for kind in MAPPERS)
