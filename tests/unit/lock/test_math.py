"""Properties of the lock losses and metrics that would break if their math were wrong."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from analoglock.bases.quality import FractionVarianceUnexplained
from analoglock.lock.losses import (
    cka_loss,
    cosine_matching,
    cycle_consistency,
    info_nce,
    l1,
    linear_cka,
    nuclear_norm,
    relation_preservation,
    rsa_loss,
    total_loss,
)
from analoglock.lock.metrics import (
    EquivarianceError,
    LockCriterion,
    MapDrift,
    PartnerRetrieval,
    retrieval_topk,
)
from analoglock.stats import derange


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """Seeded float64 Gaussian data, so tolerances can be tight."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthogonal(d: int, seed: int = 1) -> torch.Tensor:
    """A random d x d orthogonal matrix."""
    q, _ = torch.linalg.qr(randn(d, d, seed=seed))
    return q


# ---- retrieval -------------------------------------------------------------------------------


def test_retrieval_is_perfect_for_identical_rows():
    b = randn(40, 8)
    assert retrieval_topk(b.clone(), b) == {"top1": 1.0, "top5": 1.0}


def test_retrieval_is_chance_for_independent_data():
    n, trials = 50, 200
    gen = torch.Generator().manual_seed(0)
    totals = {"top1": 0.0, "top5": 0.0}
    for _ in range(trials):
        a, b = torch.randn(2, n, 8, generator=gen).unbind()
        for key, value in retrieval_topk(a, b, ks=(1, 5)).items():
            totals[key] += float(value) / trials
    # Standard error of the mean over 200 trials is ~0.0014 (top1) and ~0.003 (top5): 4 sigma.
    assert totals["top1"] == pytest.approx(1 / n, abs=0.006)
    assert totals["top5"] == pytest.approx(5 / n, abs=0.012)


def test_top5_at_least_top1_and_ks_define_keys():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        b = torch.randn(30, 6, generator=gen)
        a = b + torch.randn(30, 6, generator=gen)  # partially aligned: scores strictly between
        out = retrieval_topk(a, b, ks=(1, 5, 30))
        assert out["top5"] >= out["top1"]
        assert out["top30"] == 1.0  # every partner is in the top n


def test_collapsed_map_scores_chance_not_perfect():
    b = randn(20, 4)
    out = retrieval_topk(torch.ones(20, 4, dtype=torch.float64), b)  # every row ties
    assert out["top1"] == pytest.approx(1 / 20) and out["top5"] == pytest.approx(5 / 20)


def test_retrieval_chunking_does_not_change_the_answer():
    a, b = randn(37, 5, seed=2), randn(37, 5, seed=3)
    assert retrieval_topk(a, b, chunk_size=4) == retrieval_topk(a, b)


def test_partner_retrieval_batches_equal_single_shot():
    b = randn(60, 8)
    a = b + 0.8 * randn(60, 8, seed=4)
    metric = PartnerRetrieval(k=(1, 5))
    for rows in torch.arange(60).split(17):  # candidates must span batches, not one batch
        metric.update(a[rows], b[rows])
    batched, single = metric.compute(), retrieval_topk(a, b)
    assert 0 < single["top1"] < 1  # a case where restricting candidates to a batch would differ
    for key in single:
        assert batched[key] == pytest.approx(float(single[key]))


# ---- contrastive and matching losses ---------------------------------------------------------


def test_info_nce_prefers_true_pairs_and_is_symmetric():
    b = randn(32, 16)
    a = b + 0.3 * randn(32, 16, seed=5)
    perm = derange(32, torch.Generator().manual_seed(0))
    assert info_nce(a, b) < info_nce(a, b[perm])
    assert info_nce(a, b) == pytest.approx(float(info_nce(b, a)))


def test_cosine_matching_zero_for_same_direction_two_for_opposite():
    b = randn(10, 4)
    assert cosine_matching(b.clone(), b) == pytest.approx(0, abs=1e-12)
    assert cosine_matching(3 * b, b) == pytest.approx(0, abs=1e-12)
    assert cosine_matching(-b, b) == pytest.approx(2)


# ---- similarity-structure losses -------------------------------------------------------------


def test_linear_cka_invariances():
    X, Y = randn(64, 16), randn(64, 10, seed=6)
    Y = Y + X[:, :10]  # related to X, so the CKA is neither 0 nor 1
    assert linear_cka(X, X @ orthogonal(16)) == pytest.approx(1)
    assert linear_cka(X, 3 * X) == pytest.approx(1)
    assert linear_cka(X + 5.0, X) == pytest.approx(1)  # centring removes translations
    base = float(linear_cka(X, Y))
    assert 0.1 < base < 0.99
    assert linear_cka(2.5 * X, Y) == pytest.approx(base)
    assert linear_cka(X, 0.1 * Y) == pytest.approx(base)
    assert cka_loss(X, X @ orthogonal(16)) == pytest.approx(0, abs=1e-12)


def test_linear_cka_matches_feature_space_formula():
    X, Y = randn(30, 7), randn(30, 4, seed=7)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    expected = (Yc.T @ Xc).norm() ** 2 / ((Xc.T @ Xc).norm() * (Yc.T @ Yc).norm())
    assert linear_cka(X, Y) == pytest.approx(float(expected))


def test_linear_cka_near_zero_for_independent_data():
    # The biased estimator sits near sqrt(d1 * d2) / n = 0.004 here.
    assert linear_cka(randn(2000, 8), randn(2000, 8, seed=8)) < 0.02


def test_rsa_loss_zero_under_rotation_and_scaling_and_positive_otherwise():
    X = randn(20, 6)
    assert rsa_loss(X, 2 * X @ orthogonal(6)) == pytest.approx(0, abs=1e-12)
    assert rsa_loss(X, randn(20, 6, seed=9)) > 0.5


# ---- relation preservation and reconstruction ------------------------------------------------


def test_relation_preservation_is_translation_equivariant():
    b = randn(25, 8)
    shifted = b + randn(1, 8, seed=10)
    assert relation_preservation(shifted, b) == pytest.approx(0, abs=1e-12)
    gen = torch.Generator().manual_seed(0)
    assert relation_preservation(shifted, b, n_pairs=50, generator=gen) == pytest.approx(
        0, abs=1e-12
    )


def test_relation_preservation_detects_scrambled_or_collapsed_relations():
    b = randn(200, 8)
    perm = derange(200, torch.Generator().manual_seed(0))
    assert relation_preservation(b[perm], b) == pytest.approx(2, abs=0.3)
    assert relation_preservation(torch.zeros_like(b), b) == pytest.approx(1)


def test_relation_preservation_equals_explicit_pair_loop_and_is_scale_free():
    a, b = randn(9, 3), randn(9, 3, seed=11)
    pairs = list(itertools.combinations(range(9), 2))
    err = sum(float(((a[i] - a[j]) - (b[i] - b[j])).pow(2).sum()) for i, j in pairs)
    scale = sum(float((b[i] - b[j]).pow(2).sum()) for i, j in pairs)
    assert relation_preservation(a, b) == pytest.approx(err / scale)
    assert relation_preservation(4 * a, 4 * b) == pytest.approx(err / scale)
    gen = torch.Generator().manual_seed(0)
    sampled = relation_preservation(a, b, n_pairs=20000, generator=gen)
    assert sampled == pytest.approx(err / scale, rel=0.05)


def test_equivariance_error_batches_equal_single_shot():
    b = randn(50, 6)
    a = b @ orthogonal(6) + 0.2 * randn(50, 6, seed=12)
    metric = EquivarianceError()
    for rows in torch.arange(50).split(13):
        metric(a[rows], b[rows])  # forward, as Lightning calls it: per-batch value + accumulation
    assert metric.compute() == pytest.approx(float(relation_preservation(a, b)))


def test_fvu_perfect_is_zero_mean_is_one_and_batches_match_single_shot():
    x = randn(40, 5) + 100.0  # a large shared mean, as in residual streams
    x_hat = x + 0.5 * randn(40, 5, seed=13)
    for target, expected in ((x, 0.0), (x.mean(0).expand_as(x), 1.0), (x_hat, None)):
        metric = FractionVarianceUnexplained()
        for rows in torch.arange(40).split(11):
            metric.update(x[rows], target[rows])
        single = float(cycle_consistency(x, target))  # the same definition, in one shot
        assert metric.compute() == pytest.approx(single, abs=1e-9)
        if expected is not None:
            assert single == pytest.approx(expected, abs=1e-9)


# ---- penalties and the weighted total --------------------------------------------------------


def test_nuclear_norm_is_sum_of_singular_values():
    s = torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64)
    W = orthogonal(6)[:, :3] @ torch.diag(s) @ orthogonal(3, seed=2).T
    assert nuclear_norm(W) == pytest.approx(7.5)
    M = randn(4, 7)
    assert nuclear_norm(M) == pytest.approx(float(torch.linalg.svdvals(M).sum()))


def test_l1_is_sum_of_absolute_values():
    assert l1(torch.tensor([[1.0, -2.0], [0.5, -0.5]])) == pytest.approx(4.0)


def test_losses_are_differentiable_scalars():
    b = randn(12, 4)
    W = orthogonal(4).clone().requires_grad_(True)
    mapped = b @ W + 0.1 * randn(12, 4, seed=14)
    terms = {
        "cosine": cosine_matching(mapped, b),
        "infonce": info_nce(mapped, b),
        "cka": cka_loss(mapped, b),
        "rsa": rsa_loss(mapped, b),
        "relations": relation_preservation(mapped, b),
        "cycle": cycle_consistency(b, mapped),
        "l1": l1(W),
        "nuc": nuclear_norm(W),
    }
    for name, value in terms.items():
        assert value.ndim == 0, name
        (grad,) = torch.autograd.grad(value, W, retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_total_loss_weighs_enabled_terms_and_logs_all():
    terms = {"a": torch.tensor(2.0, requires_grad=True), "b": torch.tensor(3.0)}
    total, logged = total_loss(terms, {"a": 0.5, "b": 0.0, "unused": 0.0})
    assert float(total.detach()) == pytest.approx(1.0) and total.requires_grad
    assert logged == {"a": 2.0, "b": 3.0, "total": 1.0}
    with pytest.raises(KeyError, match="no weight"):
        total_loss(terms, {"a": 1.0})
    with pytest.raises(KeyError, match="not computed"):
        total_loss(terms, {"a": 1.0, "b": 1.0, "typo": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        total_loss(terms, {"a": -1.0, "b": 0.0})


# ---- drift, lock decision, control -----------------------------------------------------------


def test_map_drift_hand_computed():
    drift = MapDrift()
    drift.update(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert math.isinf(drift.compute())
    drift.update(torch.tensor([[1.0, 2.0], [2.0, 0.0]]))  # flattened; change (0, 2, 2, 0) / 1
    assert drift.compute() == pytest.approx(math.sqrt(8))
    drift.update(torch.tensor([1.0, 2.0, 2.0, 4.0]))  # change (0, 0, 0, 4), previous norm 3
    assert drift.compute() == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="parameter count"):
        drift.update(torch.zeros(3))
    drift.update(torch.tensor([1.0, 2.0, 2.0, 4.0]))
    assert drift.compute() == pytest.approx(0)


def _margins(top1_lo: float = 0.05, rel_hi: float = -0.1, missing: str | None = None) -> dict:
    """Evidence as evaluate.margins gives it: [mean, lo, hi] per clause."""
    out = {
        f"top1_{v}_vs_{b}": [top1_lo + 0.1, top1_lo, top1_lo + 0.2]
        for v in ("story", "roles")
        for b in ("identity", "meandiff", "procrustes")
    }
    out |= {
        f"rel_err_{v}_vs_identity": [rel_hi - 0.1, rel_hi - 0.2, rel_hi] for v in ("story", "roles")
    }
    out.pop(missing, None)
    return out


def test_lock_criterion_needs_patience_and_resets_on_failure():
    crit = LockCriterion(max_drift=0.01, patience=3)
    good, bad_margin = _margins(), _margins(top1_lo=-0.01)  # interval touches 0: a tie, not a win
    assert [crit.update(good, 0.001), crit.update(good, 0.001)] == [False, False]
    assert crit.update(bad_margin, 0.001) is False  # streak broken one epoch short
    assert [crit.update(good, 0.001) for _ in range(2)] == [False, False]
    assert crit.update(good, 0.001) is True and crit.lock_epoch == 5
    assert crit.update(good, 0.001) is True and crit.lock_epoch == 5  # the lock keeps its epoch
    assert crit.update(good, math.inf) is False and crit.lock_epoch is None
    assert crit.update(_margins(rel_hi=0.01), 0.0) is False  # relations not carried over
    # A clause with no evidence (a view missing from the data) fails; it is never passed silently.
    assert (
        crit.clauses(_margins(missing="top1_roles_vs_meandiff"), 0.0)["top1_roles_vs_meandiff"]
        is False
    )
    with pytest.raises(ValueError, match="patience"):
        LockCriterion(patience=0)


def test_relation_clause_is_not_applicable_to_translations():
    """A translation cannot change relation errors: the clause says None (reported), not True."""
    crit = LockCriterion(patience=1)
    clauses = crit.clauses(_margins(rel_hi=0.5), 0.0, relations_apply=False)
    assert clauses["rel_err_story_vs_identity"] is None
    assert crit.update(_margins(rel_hi=0.5), 0.0, relations_apply=False) is True
    assert (
        crit.clauses(_margins(rel_hi=0.5), 0.0, relations_apply=True)["rel_err_story_vs_identity"]
        is False
    )


def test_derange_is_a_derangement():
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 10, 257):
        for _ in range(20):
            perm = derange(n, gen)
            assert torch.equal(perm.sort().values, torch.arange(n))  # a permutation
            assert not (perm == torch.arange(n)).any()  # with no fixed points
    assert torch.equal(derange(2), torch.tensor([1, 0]))  # the only derangement of 2


def test_item_scores_agree_with_the_whole_set_metrics():
    """Per-item hits average to retrieval top-1; per-item relation errors average to the loss."""
    from analoglock.lock.evaluate import partner_ranks, relation_errors

    a, b = randn(30, 8, seed=1), randn(30, 8, seed=2)
    m = b + 0.5 * a  # a noisy map: some partners found, some not
    hit, rr = partner_ranks(m, b)
    assert float(hit.mean()) == pytest.approx(float(retrieval_topk(m, b, (1,))["top1"]))
    assert bool(((rr > 0) & (rr <= 1)).all()) and bool((rr[hit == 1] == 1).all())
    assert float(relation_errors(m, b).mean()) == pytest.approx(float(relation_preservation(m, b)))
    # A collapsed map (every row to one point) scores chance, not 1.
    hit0, _ = partner_ranks(torch.ones(30, 8, dtype=torch.float64), b)
    assert float(hit0.mean()) == pytest.approx(1 / 30)


def test_margins_are_paired_and_bootstrap_intervals_cover_the_mean():
    from analoglock.lock.evaluate import margins

    n = 40
    learned = {"story": {"hit": torch.ones(n), "rr": torch.ones(n), "rel_err": torch.zeros(n)}}
    base = {"story": {"hit": torch.zeros(n), "rr": torch.ones(n), "rel_err": torch.ones(n)}}
    out = margins(learned, {"identity": base, "meandiff": learned}, groups=("story",))
    assert out["top1_story_vs_identity"] == [1.0, 1.0, 1.0]
    assert out["top1_story_vs_meandiff"] == [0.0, 0.0, 0.0]  # a tie is not a margin
    assert out["rel_err_story_vs_identity"] == [-1.0, -1.0, -1.0]
    noisy = {"story": {**learned["story"], "hit": (torch.arange(n) % 2).double()}}
    mean, lo, hi = margins(noisy, {"identity": base}, groups=("story",))["top1_story_vs_identity"]
    assert lo < mean < hi and mean == pytest.approx(0.5)


def test_derange_within_keeps_groups_apart():
    from analoglock.stats import derange_within

    groups = ["story"] * 5 + ["roles"] * 7 + ["mentions"]
    perm = derange_within(groups, torch.Generator().manual_seed(0))
    assert all(groups[int(j)] == groups[i] for i, j in enumerate(perm))
    assert all(int(perm[i]) != i for i in range(12)) and int(perm[12]) == 12


def test_assignment_ranks_score_the_analogy_within_each_pair_and_ignore_shared_shifts():
    from analoglock.lock.evaluate import assignment_ranks, score_items, summarize
    from analoglock.paired import PairedActivations

    g = torch.Generator().manual_seed(0)
    pairs = [f"p{i}" for i in range(6) for _ in range(3)] + ["solo"]
    a = torch.randn(len(pairs), 16, generator=g, dtype=torch.float64)
    shift = {p: torch.randn(16, generator=g, dtype=torch.float64) * 5 for p in set(pairs)}
    b = a + torch.stack([shift[p] for p in pairs]) + 0.05 * torch.randn(a.shape, generator=g)
    hit, rr, chance = assignment_ranks(a, b, pairs)
    assert len(hit) == 18  # the one-role pair is left out
    assert hit.tolist() == [1.0] * 18 and rr.tolist() == [1.0] * 18
    assert torch.allclose(chance, torch.full((18,), 1 / 3, dtype=torch.float64))
    # a translation of the mapped rows changes nothing: only role-to-role structure counts
    t_hit, t_rr, _ = assignment_ranks(a + 100.0, b, pairs)
    assert torch.equal(t_hit, hit) and torch.equal(t_rr, rr)
    # the B roles of each pair rotated by one: every own partner is now wrong
    rot = torch.cat([b[i : i + 3].roll(1, dims=0) for i in range(0, 18, 3)] + [b[18:]])
    r_hit, _, _ = assignment_ranks(a, rot, pairs)
    assert r_hit.sum() == 0
    part = PairedActivations(
        a.float(), b.float(), pairs, ["role0"] * len(pairs), ["test"] * len(pairs)
    )
    out = summarize(score_items(a.float(), part, torch.zeros(16)))
    assert out["top1_assign"] == 1.0 and out["n_assign"] == 18
    assert out["chance_assign"] == pytest.approx(1 / 3)
    assert "equivariance_assign" not in out


def test_criterion_on_the_within_pair_assignment_has_no_relation_clause():
    c = LockCriterion(views=("assign",), baselines=("identity",), patience=1)
    verdicts = c.clauses({"top1_assign_vs_identity": [0.03, 0.01, 0.06]}, drift=0.0)
    assert verdicts == {"top1_assign_vs_identity": True, "drift": True}
    assert not c.clauses({"top1_assign_vs_identity": [0.01, -0.01, 0.04]}, 0.0)[
        "top1_assign_vs_identity"
    ]
