"""Token chains and working backwards on the tiny model: the math each number rests on."""

from __future__ import annotations

import math

import pytest
import torch

from analoglock.data import Document
from analoglock.patching import Ablate, TokenLogits, agreement, attribution_effects, exact_effects
from analoglock.patching.backwards import (
    TraceInputError,
    and_or,
    classify,
    group_ablation,
    per_prompt_drive,
    principal_cosines,
    producing_prompts,
    rank_upstream,
    route_groups,
    target_token_id,
)
from analoglock.patching.chains import (
    codes_after,
    direct_logit_effect,
    simple_cycles,
    token_feature_z,
)
from tests.helpers import LineBasis, fit_pca, last_residual, orthonormal_to

H = "blocks.1.hook_resid_post"
TEXTS = ["The cat sat on the mat", "A dog ran to the park", "Birds fly over the sea", "Once upon a time"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny passes: threads only add contention


@pytest.fixture(scope="module")
def traced(tiny_model):
    """A PCA basis at H and the prompts traced to each prompt's own greedy token (the first's)."""
    m = tiny_model
    docs = [Document(f"p{i}", t) for i, t in enumerate(TEXTS)]
    x = torch.cat([m.run_with_cache(t, names_filter=H)[1][H][0, 1:] for t in TEXTS])
    basis = fit_pca(x, 8, H)
    with torch.no_grad():
        target = int(m(TEXTS[0])[0, -1].argmax())
    return m, basis, producing_prompts(m, basis, docs, target, progress=False), docs


def test_target_must_be_one_token(tiny_model):
    tok = tiny_model.tokenizer
    assert target_token_id(tok, " down") == tok.encode(" down", add_special_tokens=False)[0]
    with pytest.raises(TraceInputError, match="tokens"):
        target_token_id(tok, " antidisestablishmentarianism")
    with pytest.raises(TraceInputError, match="empty"):
        target_token_id(tok, "")


def test_producing_prompts_drop_and_refuse(traced):
    m, basis, tr, docs = traced
    assert "p0" in [p.id for p in tr.prompts]
    kept = {p.id for p in tr.prompts} | {d["id"] for d in tr.dropped}
    assert kept == {d.id for d in docs}
    other = (tr.target + 1) % m.cfg.d_vocab
    missing = [d for d in docs if d.id not in {p.id for p in tr.prompts}] or docs
    with pytest.raises(TraceInputError, match="greedy"):
        producing_prompts(m, basis, missing[:1] if missing != docs else docs[:1], other if missing == docs else tr.target, progress=False)  # fmt: skip
    with pytest.raises(TraceInputError, match="empty"):
        producing_prompts(m, basis, [], tr.target, progress=False)


def test_group_ablation_matches_engine_and_sums(traced):
    """Single ablation = exact_effects on the TokenLogits readout; a pair = the summed delta."""
    m, basis, tr, _ = traced
    logit, _ = group_ablation(tr, basis, [[], [0], [1], [0, 1]])
    assert torch.allclose(logit[0], tr.clean_logit, atol=1e-4)
    ex = exact_effects(tr.segment, tr.cleans, basis, TokenLogits(m, [tr.target]), Ablate(1.0), upstream_ids=[0, 1], control=False, progress=False)  # fmt: skip
    assert torch.allclose((logit[1:3] - logit[0]).mean(1), ex.effect[:, 0], atol=1e-4)
    # pair: one rerun with delta = -(a_0 d_0 + a_1 d_1) at H, checked against a full forward hook
    clean = tr.cleans[0]
    a = basis.encode(clean.x1)
    delta = -(a[:, [0]] * basis.directions[0] + a[:, [1]] * basis.directions[1])
    delta[0] = 0  # BOS is not intervened on
    x2 = tr.segment.run_full(clean.ids, delta[None])
    full = m.unembed(m.ln_final(x2[:, -1:]))[0, 0, tr.target]
    assert torch.allclose(logit[3, 0], full, atol=1e-4)


def test_rank_upstream_attribution_is_pooled_and_checked(traced):
    m, basis, tr, _ = traced
    out = rank_upstream(tr, basis, k=3, progress=False)
    drive = out["drive"]
    assert drive.shape == (len(tr.cleans), basis.n_features)
    assert out["top"].tolist() == drive.mean(0).topk(3).indices.tolist()
    # the agreement is attribution vs exact over exactly the checked features, recomputed here
    rows, readout = out["checked"], TokenLogits(m, [tr.target])
    ex = exact_effects(tr.segment, tr.cleans, basis, readout, Ablate(1.0), upstream_ids=rows, control=False, progress=False)  # fmt: skip
    at = attribution_effects(tr.segment, tr.cleans, basis, readout, Ablate(1.0), upstream_ids=rows, control=False, progress=False)  # fmt: skip
    assert out["agreement"] == pytest.approx(agreement(ex, at, k=3), abs=1e-5)
    assert math.isfinite(out["agreement"]["spearman"])  # 6 distinct effects: always defined
    # the exact numbers are the engine's: recompute one
    ex = exact_effects(tr.segment, tr.cleans, basis, TokenLogits(m, [tr.target]), Ablate(1.0), upstream_ids=out["top"][:1], control=False, progress=False)  # fmt: skip
    assert abs(out["features"][0]["exact"] + float(ex.effect[0, 0])) < 1e-4


def test_classify_on_constructed_numbers():
    assert classify({1: 0.9, 2: 0.1}, {(1, 2): 0.95})["class"] == "AND-like"
    r = classify({1: 0.2, 2: 0.3}, {(1, 2): 0.8})
    assert r["class"] == "OR-like" and r["pair_killers"] == [[1, 2]]
    assert classify({1: 0.2, 2: 0.3}, {(1, 2): 0.4})["class"] == "distributed"
    assert classify({1: 0.2}, {}, kill=0.1)["single_killers"] == [1]


def test_and_or_drops_are_relative_probability(traced):
    m, basis, tr, _ = traced
    r = and_or(tr, basis, [0, 1], n_random_pairs=3)
    _, prob = group_ablation(tr, basis, [[], [0]])
    assert abs(r["single"][0]["drop"] - float((1 - prob[1] / prob[0]).mean())) < 1e-3
    single = {e["feature"]: e["drop"] for e in r["single"]}
    pairs = {tuple(e["features"]): e["drop"] for e in r["pairs"]}
    assert r["random_pairs"]["n"] == 3 and r["class"] == classify(single, pairs)["class"]


# --- AND / OR / distributed built by construction ---------------------------------------------
# The basis sits at the last block's resid_post, so the readout is the final RMSNorm and the
# unembedding of the last position, nothing else. u = x / |x| for that position's residual x.
# The final norm is scale-invariant: scaling x by 1/2 or 3/4 leaves the logits (up to its eps),
# and zeroing x leaves only the unembedding bias. So a feature holding all of x is a single
# killer (AND-like), two features holding half of x each kill only together (OR-like), and four
# holding a quarter each never kill in pairs (distributed).


@pytest.fixture(scope="module")
def line(tiny_model):
    m = tiny_model
    hook, x = last_residual(m, TEXTS[0])
    with torch.no_grad():
        target = int(m(TEXTS[0])[0, -1].argmax())
    return m, hook, x, target


def prob_after(m, x: torch.Tensor, keep: float, target: int) -> float:
    """p(target) when the last residual is scaled by `keep` (0 zeroes it): the math the test predicts."""
    with torch.no_grad():
        z = m.unembed(m.ln_final((keep * x)[None, None]))[0, 0].float()
    return float(z.softmax(-1)[target])


def lines(x: torch.Tensor, weights: list[float], hook: str, n_other: int = 3) -> LineBasis:
    """Features on u = x/|x| with the given weights, then n_other unit features orthogonal to u."""
    u = x / x.norm()
    dirs = torch.cat([u.expand(len(weights), -1), orthonormal_to(u, n_other)])
    return LineBasis(dirs, [*weights] + [1.0] * n_other, hook)


@pytest.mark.parametrize(
    ("weights", "top", "expected", "single_keep", "pair_keep"),
    [
        ([1.0], [0, 1], "AND-like", 0.0, 0.0),
        ([0.5, 0.5], [0, 1], "OR-like", 0.5, 0.0),
        ([0.25] * 4, [0, 1, 2, 3], "distributed", 0.75, 0.5),
    ],
)
def test_constructed_and_or_are_classified(line, weights, top, expected, single_keep, pair_keep):
    m, hook, x, target = line
    basis = lines(x, weights, hook)
    tr = producing_prompts(m, basis, [Document("p0", TEXTS[0])], target, progress=False)
    p0 = float(tr.clean_prob[0])
    r = and_or(tr, basis, top, n_random_pairs=2)
    assert r["class"] == expected
    drops = {e["feature"]: e["drop"] for e in r["single"]}
    n_line = len(weights)
    for f, d in drops.items():  # line features scale x; the others are orthogonal to it: no change
        keep = single_keep if f < n_line else 1.0
        assert d == pytest.approx(
            1 - prob_after(m, x, keep, target) / p0, abs=2e-4
        )  # rounded to 4 places
    pair = r["pairs"][0]  # (top[0], top[1]): both on the line
    assert pair["drop"] == pytest.approx(1 - prob_after(m, x, pair_keep, target) / p0, abs=2e-4)
    assert r["random_pairs"]["drop_max"] == pytest.approx(0.0, abs=1e-4)  # off-line features


def test_attribution_misses_a_scale_invariant_ablation(line):
    """Removing all of x changes nothing to first order (the final norm is scale-invariant), so
    the attribution of the AND feature is ~0 while its exact effect is the whole logit."""
    m, hook, x, target = line
    basis = lines(x, [1.0], hook)
    tr = producing_prompts(m, basis, [Document("p0", TEXTS[0])], target, progress=False)
    drive = per_prompt_drive(tr, basis, progress=False)[0]
    ex = exact_effects(tr.segment, tr.cleans, basis, TokenLogits(m, [target]), Ablate(1.0), upstream_ids=[0], control=False, progress=False)  # fmt: skip
    with torch.no_grad():
        zero_logit = float(m.unembed(m.ln_final(torch.zeros(1, 1, m.cfg.d_model)))[0, 0, target])
    n_pos = tr.cleans[0].measure.sum()
    # the effect is averaged over the measure positions; only the last one is read
    assert float(ex.effect[0, 0]) * n_pos == pytest.approx(zero_logit - float(tr.clean_logit[0]), abs=1e-3)  # fmt: skip
    assert abs(float(drive[0])) < 1e-3 * abs(float(ex.effect[0, 0]) * n_pos)


def test_routes_and_principal_angles():
    assert route_groups([{1, 2}, {1, 2, 3}, {7, 8}], 0.5) == [[0, 1], [2]]
    q = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64))[0].T
    assert torch.allclose(principal_cosines(q, q), torch.ones(3, dtype=torch.float64))
    e = torch.eye(10, dtype=torch.float64)
    assert torch.allclose(principal_cosines(e[:2], e[2:4]), torch.zeros(2, dtype=torch.float64))
    # a 45-degree tilt: cos = 1/sqrt(2)
    tilt = ((e[0] + e[1]) / 2**0.5)[None]
    assert abs(float(principal_cosines(e[:1], tilt)[0]) - 2**-0.5) < 1e-9


def test_direct_logit_effect_is_gain_times_unembedding(tiny_model):
    """For a vector of unit RMS the final RMSNorm is exactly its gain: logits = DLE (+ b_U)."""
    m = tiny_model
    d = torch.randn(5, m.cfg.d_model)
    d = d / d.pow(2).mean(-1, keepdim=True).sqrt()
    with torch.no_grad():
        logits = m.unembed(m.ln_final(d[:, None]))[:, 0]
    b = getattr(m, "b_U", None)
    b = torch.zeros(m.cfg.d_vocab) if b is None else b.detach()
    assert torch.allclose(direct_logit_effect(m, d) + b, logits, atol=1e-3, rtol=1e-3)


def test_codes_after_and_token_z(tiny_model, traced):
    m, basis, _, _ = traced
    ctx = [m.to_tokens("The")[0], m.to_tokens("I think that")[0]]
    codes = codes_after(m, basis, ctx, [100, 200], batch=1)
    x = m.run_with_cache(torch.cat([ctx[1], torch.tensor([200])])[None], names_filter=H)[1][H][0, -1]  # fmt: skip
    assert torch.allclose(codes[1, 1], basis.encode(x), atol=1e-4)
    controls = [300, 400, 500, 600]
    z, zc = token_feature_z(m, basis, ctx, [100], controls)
    c = codes_after(m, basis, ctx, [100, *controls]).mean(0)
    assert torch.allclose(z[0], (c[0] - c[1:].mean(0)) / c[1:].std(0).clamp_min(1e-6), atol=1e-4)
    assert zc.shape == (4, basis.n_features)


def test_simple_cycles():
    edges = [("F1", "T5"), ("T5", "F2"), ("F2", "T6"), ("T6", "F1"), ("F2", "T7")]
    assert simple_cycles(edges) == [["F1", "T5", "F2", "T6"]]
    assert simple_cycles([("F1", "T5")]) == []


def test_trace_report_renders(traced, tmp_path):
    """Both analyses end to end on the tiny model; the report draws in headless Chromium."""
    from analoglock.patching.backwards import trace_backwards
    from analoglock.patching.chains import trace_chains
    from analoglock.reports.chains import write_trace_report
    from tests.browser import is_blank, render_screenshot, require_chromium

    m, basis, tr, docs = traced
    target = m.tokenizer.decode([tr.target])
    back = trace_backwards(m, basis, docs, target, k=3, and_or_k=2, route_k=2, progress=False)
    assert back["n_prompts"] == len(tr.prompts)
    andor = back["and_or"]  # the class follows from the measured drops
    single = {e["feature"]: e["drop"] for e in andor["single"]}
    pairs = {tuple(e["features"]): e["drop"] for e in andor["pairs"]}
    assert andor["class"] == classify(single, pairs, andor["kill"])["class"]
    chains = trace_chains(m, basis, docs[:2], n_features=3, k_tokens=2, n_controls=8, progress=False)  # fmt: skip
    assert len(chains["feature_token"]) == 3 * 2
    for e in chains["token_feature"]:
        assert e["z"] > chains["z_floor"]
    html = write_trace_report(tmp_path / "report.html", chains, back)
    require_chromium()
    png = render_screenshot(html, tmp_path / "shot.png")
    assert not is_blank(png)
