"""Intervals on the patching comparisons, on constructed effect matrices with known answers:
`agreement_bootstrap` (attribution vs exact, resampling upstream features) and
`control_contrast` (each feature's effect vs its random-direction control, paired)."""

from __future__ import annotations

import pytest
import torch

from analoglock.patching import agreement, agreement_bootstrap, beats_control, control_contrast
from analoglock.stats import bootstrap_indices, percentile_interval

pytestmark = pytest.mark.usefixtures("one_thread")

STATS = ("spearman", "pearson", "spearman_topk", "topk_overlap", "sign_agreement")


def matrix(n_up: int, n_down: int, seed: int) -> torch.Tensor:
    return torch.randn(n_up, n_down, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # fmt: skip


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_perfect_agreement_gives_one_and_a_point_interval(scale):
    x = matrix(15, 8, 0)
    exact = torch.cat([x, x])  # duplicated rows: top-k ties between copies must not cost overlap
    out = agreement_bootstrap(exact, scale * exact, k=37, n_boot=200, seed=0)
    for stat in STATS:
        assert out["point"][stat] == pytest.approx(1.0, abs=1e-6), stat
        assert out["ci"][stat] == pytest.approx([1.0, 1.0], abs=1e-6), stat
    assert (out["n_upstream"], out["n_downstream"], out["n_boot"], out["seed"]) == (30, 8, 200, 0)


def test_noisy_agreement_interval_is_inside_and_holds_the_point():
    exact = matrix(40, 16, 1)
    noisy = exact + 1.0 * matrix(40, 16, 2)
    out = agreement_bootstrap(exact, noisy, k=50, n_boot=500, seed=0)
    for stat in ("spearman", "pearson"):
        lo, hi = out["ci"][stat]
        assert -1.0 < lo < out["point"][stat] < hi < 1.0, (stat, lo, hi)
    lo, hi = out["ci"]["sign_agreement"]
    assert 0.0 < lo < out["point"]["sign_agreement"] < hi < 1.0
    # more noise agrees less, and the intervals say so
    worse = agreement_bootstrap(exact, exact + 4.0 * matrix(40, 16, 2), k=50, n_boot=500, seed=0)
    assert worse["ci"]["spearman"][1] < out["ci"]["spearman"][0]
    # against unrelated numbers the interval holds 0 (over 40 such draws it did 38 times: 95%;
    # draw 3 is one of the other two)
    null = agreement_bootstrap(exact, matrix(40, 16, 4), k=50, n_boot=500, seed=0)
    assert null["ci"]["spearman"][0] < 0.0 < null["ci"]["spearman"][1]


def test_resamples_are_whole_upstream_rows():
    exact = matrix(12, 6, 4)
    approx = exact + matrix(12, 6, 5)
    out = agreement_bootstrap(exact, approx, k=20, n_boot=50, seed=3)
    rows = bootstrap_indices(12, 50, 3)[7]  # the 8th resample: these rows, every column of each
    again = agreement(exact[rows], approx[rows], k=20)
    for stat in STATS:
        assert float(out["replicates"][stat][7]) == pytest.approx(again[stat], abs=1e-9), stat
    # one upstream feature: every resample is that feature, however noisy its downstream codes
    one = agreement_bootstrap(exact[:1], approx[:1], k=3, n_boot=100, seed=0)
    assert one["ci"]["spearman"] == pytest.approx([one["point"]["spearman"]] * 2, abs=1e-9)
    assert abs(one["point"]["spearman"]) < 1.0  # not [1, 1] trivially


def test_bootstrap_is_seeded():
    exact, approx = matrix(25, 4, 6), matrix(25, 4, 7) + matrix(25, 4, 6)
    a = agreement_bootstrap(exact, approx, n_boot=100, seed=0)
    assert a["ci"] == agreement_bootstrap(exact, approx, n_boot=100, seed=0)["ci"]
    assert a["ci"] != agreement_bootstrap(exact, approx, n_boot=100, seed=1)["ci"]
    with pytest.raises(ValueError, match="one shape"):
        agreement_bootstrap(exact, approx[:, :3])


def test_percentile_interval_drops_undefined_replicates():
    r = torch.tensor([float("nan"), 1.0, 2.0, 3.0, float("nan")])
    assert percentile_interval(r, level=1.0) == (1.0, 3.0)
    lo, hi = percentile_interval(torch.full((4,), float("nan")))
    assert lo != lo and hi != hi  # all undefined: NaN, not a number that looks like an interval


def test_control_contrast_is_paired_per_upstream_feature():
    base = matrix(20, 8, 8)
    control = torch.sign(base) * (base.abs() + 0.3)  # |control| >= 0.3 > the largest negative gap
    gap = torch.linspace(-0.2, 1.0, 20, dtype=torch.float64)  # feature i beats its control by it
    effect = torch.sign(matrix(20, 8, 9)) * (control.abs() + gap[:, None])
    out = control_contrast(effect, control, n_boot=500, seed=0)
    assert out["effect_minus_control_mean"] == pytest.approx(float(gap.mean()), abs=1e-12)
    lo, hi = out["effect_minus_control_ci"]
    assert lo < out["effect_minus_control_mean"] < hi and lo > 0.0
    assert out["n_upstream_effect_above_control"] == int((gap > 0).sum())
    # the edges count is graph.json's per-edge rule: above its own control and the pooled floor
    floor = float(torch.quantile(control.abs().flatten(), 0.95))
    expect = sum(
        abs(float(effect[i, j])) > max(floor, abs(float(control[i, j])))
        for i in range(20)
        for j in range(8)
    )
    assert out["n_edges_beating_control"] == expect == int(beats_control(effect, control).sum())
    assert 0 < expect < 20 * 8 and out["n_edges"] == 160
    same = control_contrast(control.clone(), control, n_boot=100)  # effect == control: no gap
    assert same["effect_minus_control_ci"] == [0.0, 0.0] and same["n_edges_beating_control"] == 0
