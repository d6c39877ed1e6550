"""The lock report's held-out bars: every measure it knows, chance where it is defined."""

from __future__ import annotations

from analoglock.reports.lock import lock_curves
from analoglock.reports.lock import test_bars as held_out_bars


def test_bars_draw_the_within_pair_assignment_against_its_own_chance():
    summary = {
        "learned": {"top1_story": 0.9, "top1_roles": 0.3, "mrr_roles": 0.4, "n_story": 60,
                    "n_roles": 224, "top1_assign": 0.97, "chance_assign": 0.268, "n_assign": 224},
        "identity": {"top1_story": 0.7, "top1_roles": 0.26, "mrr_roles": 0.38, "n_story": 60,
                     "n_roles": 224, "top1_assign": 0.93, "chance_assign": 0.268, "n_assign": 224},
    }  # fmt: skip
    fig = held_out_bars(summary)
    assert len(fig.data) == 4  # stories, roles, role MRR, assignment
    chances = sorted(round(s["y0"], 4) for s in fig.layout.shapes)
    assert chances == [round(1 / 224, 4), round(1 / 224, 4), round(1 / 60, 4), 0.268]
    # a run from before the measure existed: three panels, nothing invented
    old = {k: {m: v for m, v in d.items() if "assign" not in m} for k, d in summary.items()}
    assert len(held_out_bars(old).data) == 3


def test_lock_curves_skip_a_relation_trace_where_a_view_has_none():
    history = [
        {"epoch": e, "drift": 0.1, "locked": False,
         "margins": {"top1_assign_vs_identity": [0.02, 0.0, 0.05],
                     "rel_err_roles_vs_identity": [0.0, -0.01, 0.01]}}
        for e in range(2)
    ]  # fmt: skip
    fig = lock_curves(history, views=("roles", "assign"))
    names = [t.name for t in fig.data]
    assert "rel. error roles" in names and "rel. error assign" not in names
    assert "vs identity" in names
