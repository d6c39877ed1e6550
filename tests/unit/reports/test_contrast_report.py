"""steer.html for contrast vectors: every figure and table, one colour per aggregator or arm in
every panel, built from a report assembled by the protocol's own statistics (no model)."""

from __future__ import annotations

import html

import torch

from analoglock.relations.contrast_arms import (
    MEASURES,
    ArmValues,
    point_measures,
    random_p_values,
    summarize,
)
from analoglock.reports.contrast import ARM_COLOURS, numbers_table, plot_contrast

AGGS = ("meandiff", "pca", "probe")


def _arm(name: str, seed: int, n: int = 4) -> ArmValues:
    gen = torch.Generator().manual_seed(seed)
    u = lambda: torch.rand(n, generator=gen)  # noqa: E731
    return ArmValues(
        name, {"scale": 2.0, "norm": 3.0}, [f"<{name} text {i}>" for i in range(n)],
        score=u(), judge=torch.full((n,), float("nan")), ppl=1 + 10 * u(), distinct2=0.5 + u() / 2,
        loop=(u() > 0.8).float(), neutral_kl=torch.rand(3, generator=gen),
    )  # fmt: skip


def fake_report() -> dict:
    measures = [m for m in MEASURES if m != "judge_shift"]
    results = {"unsteered": _arm("unsteered", 0), **{a: _arm(a, k + 1) for k, a in enumerate(AGGS)}}
    randoms = [_arm(f"random_0_{k:02d}", 10 + k) for k in range(5)]
    base = results["unsteered"]
    values = [point_measures(r, base, measures) for r in randoms]
    sweep = [
        {"aggregator": a, "scale": s, "positions": "all", "norm": s,
         **point_measures(_arm(a, int(s) + k), base, measures)}
        for k, a in enumerate(AGGS) for s in (1.0, 4.0)
    ]  # fmt: skip
    return {
        "source": {
            "spec": "emotion:angry-calm",
            "direction": "angry - calm",
            "splits": {"train": 36},
        },
        "hooks": ["blocks.2.hook_resid_post"],
        "read": "last",
        "aggregators": list(AGGS),
        "measures": measures,
        "probe": {"hook": "blocks.2.hook_resid_post", "heldout_accuracy": 0.9, "n_heldout": 12},
        "selection": {
            "split": "validation",
            "n_prompts": 4,
            "criterion": {"max_fluency_ratio": 1.5, "min_diversity_ratio": 0.8},
            "chosen": {a: {**sweep[2 * k], "constraint_met": k != 1} for k, a in enumerate(AGGS)},
        },  # fmt: skip
        "sweep": sweep,
        "test": {
            "split": "test",
            "n_prompts": 4,
            "n_neutral": 3,
            "summary": summarize(results, measures, n_boot=50),
            "random": {
                a: {
                    "n": 5,
                    "kind": "covariance",
                    "observed": point_measures(results[a], base, measures),
                    "values": {m: [v[m] for v in values] for m in measures},
                    "p_values": random_p_values(point_measures(results[a], base, measures), values),
                }
                for a in AGGS
            },
        },  # fmt: skip
        "generations": [
            {
                "id": f"e/{i}",
                "prompt": f"prompt {i} & more",
                **{a: r.texts[i] for a, r in results.items()},
                "random": randoms[0].texts[i],
            }
            for i in range(4)
        ],  # fmt: skip
    }


def test_contrast_html_one_colour_per_arm_in_every_panel(tmp_path):
    report = fake_report()
    figs = plot_contrast(report, tmp_path / "steer.html")
    page = (tmp_path / "steer.html").read_text()
    assert "<html>" in page and len(page) > 1_000_000  # plotly.js inlined: opens offline
    assert page.count("Plotly.newPlot") == 3 and set(figs) == {
        "test arms", "random directions", "validation sweep"
    }  # fmt: skip
    assert html.escape("<probe text 2>") in page and "prompt 1 &amp; more" in page
    assert "no scale met the limits" in page  # pca's flag
    seen: dict[str, set[str]] = {}
    for fig in figs.values():
        for trace in fig.data:
            lines = trace.type == "scatter" and "lines" in (trace.mode or "")
            seen.setdefault(trace.legendgroup, set()).add(
                trace.line.color if lines else trace.marker.color
            )
    assert set(seen) == {"unsteered", "random", *AGGS}
    for arm, colours in seen.items():  # one colour per arm across every panel, as the legend
        assert colours == {ARM_COLOURS[arm]}, arm
    assert len(set(ARM_COLOURS.values())) == len(ARM_COLOURS)


def test_numbers_table_has_every_arm_the_p_values_and_the_paired_rows():
    report = fake_report()
    table = numbers_table(report)
    for text in ("mean difference", "logistic probe", "p vs 5 random", "pca_vs_meandiff"):
        assert text in table
    p = report["test"]["random"]["probe"]["p_values"]["concept_shift"]
    assert 1 / 6 <= p <= 1.0 and f"{p:.2g}" in table
