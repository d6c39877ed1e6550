"""Patching engine on the tiny model: every predicted effect equals the effect measured by intervening."""

from __future__ import annotations

import json

import pytest
import torch

from analoglock.bases import PCABasis
from analoglock.data import Document
from analoglock.patching import (
    Ablate,
    IdentityBasis,
    InterventionError,
    MeanAblate,
    Patch,
    PatchSetupError,
    Segment,
    TokenLogits,
    agreement,
    all_routes,
    attribution_effects,
    build_prompts,
    clean_runs,
    exact_effects,
    parse_routes,
    position_effects,
)
from analoglock.positions import AllTokens, LastToken, TokenIndices
from tests import helpers

H1, H2 = "blocks.0.hook_resid_post", "blocks.2.hook_resid_post"
DOCS = [
    Document("a", "The quick brown fox jumps over the lazy dog."),
    Document("b", "Once upon a time a slow tortoise raced a hare."),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def fit_pca(runs, attr: str, k: int, hook: str) -> PCABasis:
    """A PCA basis on the clean activations of the prompt set (non-BOS rows)."""
    return helpers.fit_pca(torch.cat([getattr(r, attr)[1:] for r in runs]), k, hook)


@pytest.fixture(scope="module")
def setup(tiny_model):
    seg = Segment(tiny_model, H1, H2)
    runs = clean_runs(seg, build_prompts(tiny_model, DOCS), progress=False)
    return seg, runs, fit_pca(runs, "x1", 12, H1), fit_pca(runs, "x2", 6, H2)


@pytest.mark.parametrize(
    ("h1", "h2"),
    [
        (H1, H2),
        ("blocks.1.hook_attn_out", "blocks.3.hook_mlp_out"),
        ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid"),
        ("blocks.1.hook_mlp_out", "blocks.2.hook_attn_out"),
        ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"),
        ("blocks.3.hook_resid_post", "blocks.3.hook_resid_post"),
    ],
)
def test_segment_rerun_equals_full_forward(tiny_model, h1, h2):
    seg = Segment(tiny_model, h1, h2)
    ids = tiny_model.to_tokens(DOCS[0].text)[0]
    clean = seg.clean(ids)
    delta = torch.randn(3, len(ids), tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        short, full = seg.run(clean, delta), seg.run_full(ids, delta)
        again = seg.run(clean, torch.zeros(1, len(ids), tiny_model.cfg.d_model))
    torch.testing.assert_close(short, full, atol=2e-5, rtol=1e-4)
    assert torch.equal(
        again[0], clean.x2
    )  # a zero intervention reproduces the clean pass bit for bit
    assert (short - clean.x2).abs().max() > 1e-2  # and a real one changes h2
    assert all(seg.start <= b <= seg.end for b in seg.blocks)  # nothing before h1 or after h2 runs


@pytest.mark.parametrize("h2", ["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"])
def test_ablation_at_h2_equals_h1_is_linear_algebra(tiny_model, h2):
    """With no block between h1 and h2, E[i, j] = -mean_t a_i[t] * (d_i . v_j) exactly."""
    seg = Segment(tiny_model, "blocks.1.hook_resid_post", h2)
    runs = clean_runs(seg, build_prompts(tiny_model, DOCS), progress=False)
    U = fit_pca(runs, "x1", 10, seg.h1.name)
    V = PCABasis(5, hook=h2).fit(torch.cat([r.x2 for r in runs]))
    E = exact_effects(seg, runs, U, V, Ablate(1.0), progress=False)
    a_sum = sum(U.encode(r.x1)[r.intervene].sum(0) for r in runs)
    n = sum(int(r.measure.sum()) for r in runs)
    predicted = -(a_sum / n)[:, None] * (U.directions @ V.directions.T)
    torch.testing.assert_close(E.effect, predicted, atol=1e-5, rtol=1e-4)
    A = attribution_effects(seg, runs, U, V, Ablate(1.0), progress=False)
    torch.testing.assert_close(
        A.effect, predicted, atol=1e-5, rtol=1e-4
    )  # linear: first order is exact
    assert not torch.allclose(E.control, E.effect)  # the control direction is not the feature's


def test_attribution_is_the_small_alpha_limit_of_exact(setup):
    seg, runs, U, V = setup
    alpha = 1e-3
    small = exact_effects(seg, runs, U, V, Ablate(alpha), progress=False)
    A = attribution_effects(seg, runs, U, V, Ablate(1.0), progress=False)
    scale = A.effect.abs().max()
    assert (small.effect / alpha - A.effect).abs().max() < 1e-2 * scale
    assert (small.control / alpha - A.control).abs().max() < 1e-2 * A.control.abs().max()
    full = exact_effects(seg, runs, U, V, Ablate(1.0), progress=False)
    assert (full.effect - A.effect).abs().max() > 1e-3 * scale  # full ablation is not linear here
    agree = agreement(full, A, k=10)
    assert -1.0 <= agree["spearman"] <= 1.0 and 0.0 <= agree["topk_overlap"] <= 1.0


def test_stacked_batch_equals_one_at_a_time(setup):
    seg, runs, U, V = setup
    stacked = exact_effects(seg, runs, U, V, Ablate(1.0), batch_tokens=10**6, progress=False)
    single = exact_effects(seg, runs, U, V, Ablate(1.0), batch_tokens=1, progress=False)
    torch.testing.assert_close(stacked.effect, single.effect, atol=1e-5, rtol=1e-4)
    # and one feature by hand, through the full-forward reference
    i, r = 3, runs[0]
    a = U.encode(r.x1)
    delta = (-a[:, i] * r.intervene)[:, None] * U.directions[i]
    with torch.no_grad():
        x2 = seg.run_full(r.ids, delta[None])[0]
    by_hand = (V.encode(x2)[r.measure] - V.encode(r.x2)[r.measure]).sum(0)
    only_first = exact_effects(seg, runs[:1], U, V, Ablate(1.0), upstream_ids=[i], progress=False)
    torch.testing.assert_close(only_first.effect[0], by_hand / int(r.measure.sum()), atol=1e-5, rtol=1e-4)  # fmt: skip


def test_mean_ablation(setup, tiny_model):
    seg, _, U, V = setup
    # one position per prompt: a mean equal to the code there is no change at all
    runs = clean_runs(seg, build_prompts(tiny_model, DOCS[:1], intervene_at=TokenIndices([-1])), progress=False)  # fmt: skip
    a_last = U.encode(runs[0].x1)[-1]
    E = exact_effects(seg, runs, U, V, MeanAblate(a_last), progress=False)
    assert torch.count_nonzero(E.effect) == 0
    shifted = exact_effects(seg, runs, U, V, MeanAblate(a_last + 1.0), progress=False)
    plus_one = exact_effects(seg, runs, U, V, Ablate(1.0), progress=False)
    assert shifted.effect.abs().max() > 0 and not torch.allclose(shifted.effect, plus_one.effect)
    # default means: the pooled mean over intervention positions, mean - a per position
    runs2 = clean_runs(seg, build_prompts(tiny_model, DOCS), progress=False)
    mean = torch.cat([U.encode(r.x1)[r.intervene] for r in runs2]).mean(0)
    torch.testing.assert_close(
        exact_effects(seg, runs2, U, V, MeanAblate(), upstream_ids=[0, 5], progress=False).effect,
        exact_effects(
            seg, runs2, U, V, MeanAblate(mean), upstream_ids=[0, 5], progress=False
        ).effect,
    )


def test_counterfactual_patch_sets_code_to_source(tiny_model):
    seg = Segment(tiny_model, "blocks.1.hook_resid_post", "blocks.1.hook_resid_post")
    base = [Document("x", "At dawn the tiger crept down to the river.")]
    src = [Document("c", "At dawn the lion crept down to the river.")]
    runs = clean_runs(seg, build_prompts(tiny_model, base, sources=src), progress=False)
    U = IdentityBasis(tiny_model.cfg.d_model, hook=seg.h1.name)
    E = exact_effects(seg, runs, U, U, Patch(), progress=False)
    r = runs[0]
    diff = (r.x1_source - r.x1)[r.measure].mean(0)
    torch.testing.assert_close(E.effect.diagonal(), diff, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(E.effect - torch.diag(E.effect.diagonal())) == 0


def test_paths_all_is_total_none_is_zero(setup):
    seg, runs, U, V = setup
    total = exact_effects(seg, runs, U, V, Ablate(1.0), progress=False)
    every = exact_effects(seg, runs, U, V, Ablate(1.0), routes=all_routes(seg), progress=False)
    torch.testing.assert_close(every.effect, total.effect)
    nothing = exact_effects(seg, runs, U, V, Ablate(1.0), routes=parse_routes("none", seg), progress=False)  # fmt: skip
    assert nothing.effect.abs().max() < 1e-5 * total.effect.abs().max()
    # direct only: the delta reaches h2 untouched, so the effect is linear algebra again
    direct = exact_effects(seg, runs, U, V, Ablate(1.0), routes=parse_routes("direct", seg), progress=False)  # fmt: skip
    a_sum = sum(U.encode(r.x1)[r.intervene].sum(0) for r in runs)
    n = sum(int(r.measure.sum()) for r in runs)
    torch.testing.assert_close(direct.effect, -(a_sum / n)[:, None] * (U.directions @ V.directions.T), atol=1e-5, rtol=1e-4)  # fmt: skip
    mlp = exact_effects(seg, runs, U, V, Ablate(1.0), routes=parse_routes("mlp,direct", seg), progress=False)  # fmt: skip
    assert not torch.allclose(mlp.effect, total.effect, atol=1e-4)  # freezing attention matters
    # attribution through a route is the small-alpha limit of exact through that route
    routes = parse_routes("blocks.1.mlp,blocks.2", seg)
    small = exact_effects(seg, runs, U, V, Ablate(1e-3), routes=routes, progress=False)
    A = attribution_effects(seg, runs, U, V, Ablate(1.0), routes=routes, progress=False)
    assert (small.effect / 1e-3 - A.effect).abs().max() < 1e-2 * A.effect.abs().max()
    assert sorted(routes.components) == ["blocks.1.mlp", "blocks.2.attn", "blocks.2.mlp"]


def test_matches_transformer_lens_activation_patching(tiny_model):
    from transformer_lens.patching import get_act_patch_resid_pre

    clean_docs = [Document("c1", "The lion ran home"), Document("c2", "A lion sat down")]
    corrupt_docs = [Document("x1", "The tiger ran home"), Document("x2", "A tiger sat down")]
    prompts = build_prompts(
        tiny_model, corrupt_docs, AllTokens(include_bos=True), LastToken(), sources=clean_docs
    )
    assert len({len(p.ids) for p in prompts}) == 1  # TL patches a batch of equal-length prompts
    corrupted = torch.stack([p.ids for p in prompts])
    clean = torch.stack([p.source_ids for p in prompts])
    tok_a, tok_b = 300, 400

    def metric(logits):
        return (logits[:, -1, tok_a] - logits[:, -1, tok_b]).mean()

    _, cache = tiny_model.run_with_cache(clean)
    theirs = get_act_patch_resid_pre(tiny_model, corrupted, cache, metric)
    unpatched = metric(tiny_model(corrupted))
    V = TokenLogits(tiny_model, [tok_a, tok_b])
    ours = torch.zeros_like(theirs)
    for layer in range(tiny_model.cfg.n_layers):
        seg = Segment(tiny_model, f"blocks.{layer}.hook_resid_pre", V.hook)
        runs = clean_runs(seg, prompts, progress=False)
        U = IdentityBasis(tiny_model.cfg.d_model, hook=seg.h1.name)
        e = position_effects(seg, runs, U, V, Patch())
        ours[layer] = e[:, 0] - e[:, 1] + unpatched
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert theirs.abs().max() > 0.1  # the patch moves the metric: the comparison is not 0 == 0


def test_bad_input_is_refused(tiny_model, setup, tmp_path):
    seg, runs, U, V = setup
    with pytest.raises(PatchSetupError, match="before upstream"):
        Segment(tiny_model, H2, H1)
    with pytest.raises(PatchSetupError, match="residual-stream write"):
        Segment(tiny_model, "blocks.1.hook_resid_mid", H2)
    with pytest.raises(PatchSetupError, match="outside the transformer blocks"):
        Segment(tiny_model, "hook_embed", H2)
    with pytest.raises(InterventionError, match=r"\[0, 1\]"):
        Ablate(1.5)
    with pytest.raises(PatchSetupError, match="empty"):
        build_prompts(tiny_model, [])
    with pytest.raises(InterventionError, match="source"):
        exact_effects(seg, runs, U, V, Patch(), progress=False)
    with pytest.raises(PatchSetupError, match="align token by token"):
        build_prompts(tiny_model, DOCS[:1], sources=[Document("s", "Short.")])
    with pytest.raises(PatchSetupError, match="valid routes"):
        parse_routes("blocks.3.mlp", seg)
    with pytest.raises(PatchSetupError, match="fit at"):
        exact_effects(seg, runs, V, V, Ablate(1.0), progress=False)
    from analoglock.patching.run import check_args, preflight

    with pytest.raises(InterventionError, match="alpha"):
        check_args("partial", -0.1, "both")
    a, b = U.save(tmp_path / "u", model={"sha256": "a" * 64}), V.save(tmp_path / "v", model={"sha256": "b" * 64})  # fmt: skip
    with pytest.raises(PatchSetupError, match="different models"):
        preflight(a, b)
    with pytest.raises(PatchSetupError, match="swap them"):
        preflight(V.save(tmp_path / "v2", model={"sha256": "a" * 64}), a)


def test_run_writes_graph_report_and_effects(tiny_model, setup, tmp_path):
    from analoglock.model import model_info
    from analoglock.patching.run import effects_from_disk, run_patch
    from analoglock.reports.patch import write_run_report

    _, _, U, V = setup
    info = model_info(tiny_model).to_dict()
    up, down = U.save(tmp_path / "u", model=info), V.save(tmp_path / "v", model=info)
    run = run_patch(tiny_model, up, down, DOCS, tmp_path / "out", method="both", progress=False)
    summary = run.summary
    assert not (tmp_path / "out" / "report.html").exists()  # the library writes no HTML
    assert write_run_report(run) == tmp_path / "out" / "report.html"
    graph = json.loads((tmp_path / "out" / "graph.json").read_text())
    assert summary["edges"] == len(graph["edges"]) > 0
    edge = graph["edges"][0]
    assert {"effect", "control", "attribution", "attribution_control", "beats_control", "p_control"} <= set(edge)  # fmt: skip
    null = effects_from_disk(tmp_path / "out")["exact/control"].abs().flatten()
    hits = int((null >= abs(edge["effect"])).sum())  # the empirical p against every pair's control
    assert edge["p_control"] == pytest.approx((1 + hits) / (1 + len(null)), abs=1e-6)
    assert graph["control_null"]["n_draws"] == len(null) == U.n_features * V.n_features
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert edge["source"] in nodes and edge["target"] in nodes
    assert len(nodes[edge["source"]]["tokens"]) == 5 and nodes[edge["source"]]["layer"] == 0
    saved = effects_from_disk(tmp_path / "out")
    strongest = saved["exact/effect"].abs().max()
    assert abs(edge["effect"]) == pytest.approx(float(strongest), rel=1e-4)  # ranked by |exact|
    assert "plotly" in (tmp_path / "out" / "report.html").read_text()[:2_000_000]
    rows = graph["threshold_study"]["rows"]
    kept = [r["pairs_kept"] for r in rows if r["criterion"] == "effect"]
    assert kept == sorted(kept, reverse=True) and kept[0] == U.n_features * V.n_features
    # max_upstream / max_downstream keep the most active nodes, and their effects are the full run's
    cut = run_patch(tiny_model, up, down, DOCS, tmp_path / "cut", method="exact", max_upstream=5, max_downstream=3, progress=False)  # fmt: skip
    kept = effects_from_disk(tmp_path / "cut")
    act_up, act_down = saved["activation_upstream"], saved["activation_downstream"]
    want_up, want_down = (
        act_up.topk(5).indices.sort().values,
        act_down.topk(3).indices.sort().values,
    )
    assert kept["upstream_ids"].tolist() == want_up.tolist() and kept["downstream_ids"].tolist() == want_down.tolist()  # fmt: skip
    full = saved["exact/effect"][want_up][:, want_down]
    torch.testing.assert_close(kept["exact/effect"], full, rtol=1e-4, atol=1e-6)
    assert (
        cut.summary["methods"]["exact"]["n_upstream"],
        cut.summary["methods"]["exact"]["n_downstream"],
    ) == (5, 3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        run_patch(tiny_model, up, down, DOCS, tmp_path / "file", progress=False)
    with pytest.raises(PatchSetupError, match="loaded model"):
        other = V.save(tmp_path / "v3", model={**info, "sha256": "c" * 64})
        run_patch(tiny_model, U.save(tmp_path / "u3", model={**info, "sha256": "c" * 64}), other, DOCS, tmp_path / "x")  # fmt: skip
