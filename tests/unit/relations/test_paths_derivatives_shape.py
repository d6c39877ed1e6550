"""Interpolation, singular-direction derivatives and shape search .

Exact math first (slerp, endpoints reproduce plain runs, JVP = finite difference = double
backward = TransformerLens's JacobianLens, the KV-cache shortcut = the full forward, planted
shapes found first above their random baselines), then bad input.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from analoglock.data import DatasetFormatError, load_pairs
from analoglock.hooks import HookNameError
from analoglock.relations import derivatives as dv
from analoglock.relations import interpolate as ip
from analoglock.relations import jacobian as jac
from analoglock.relations import paths as pa
from analoglock.relations import shape as sh
from analoglock.relations import text as tx
from analoglock.relations.common import text_basis
from analoglock.reports.relation_paths import interpolate_figures, jacobian_figures
from analoglock.stats import random_unit_directions

# ---------------------------------------------------------------- interpolation math


def test_slerp_hits_endpoints_and_moves_on_the_great_circle():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    b = b / b.norm(dim=-1, keepdim=True) * a.norm(dim=-1, keepdim=True)  # equal norms per row
    t = pa.step_grid(9)
    path = pa.slerp(a, b, t)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)  # bit-exact endpoints
    torch.testing.assert_close(path.norm(dim=-1), a.norm(dim=-1).expand(9, -1), rtol=1e-5, atol=0)
    theta = torch.arccos(torch.nn.functional.cosine_similarity(a, b, dim=-1))
    angle_from_a = torch.arccos(
        torch.nn.functional.cosine_similarity(path, a.expand_as(path), dim=-1).clamp(-1, 1)
    )
    torch.testing.assert_close(angle_from_a, t[:, None].float() * theta, atol=2e-3, rtol=0)


def test_slerp_norm_moves_linearly_and_parallel_inputs_fall_back_to_lerp():
    a = torch.tensor([[3.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    t = pa.step_grid(5)
    norms = pa.slerp(a, b, t).norm(dim=-1)[:, 0]
    torch.testing.assert_close(norms, (3 * (1 - t) + t).float())
    same = pa.slerp(a, 2 * a, t)
    torch.testing.assert_close(same, pa.lerp(a, 2 * a, t))


def test_lerp_is_exact_at_the_ends_and_grid_needs_two_steps():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    p = pa.lerp(a, b, pa.step_grid(3))
    assert torch.equal(p[0], a) and torch.equal(p[-1], b)
    torch.testing.assert_close(p[1], (a + b) / 2)
    with pytest.raises(ValueError, match="n_steps must be >= 2"):
        pa.step_grid(1)
    with pytest.raises(ValueError, match="valid: linear, slerp"):
        pa.interpolate(a, b, pa.step_grid(2), "cubic")


def test_commonalities_and_tangents_follow_their_definitions():
    z = torch.tensor(
        [
            [3.0, 0.0, 3.0, 0.0, 1.9],  # t = 0
            [2.5, 4.0, 0.0, 2.2, 0.0],
            [3.0, 0.5, 0.0, 0.0, 1.9],  # t = 1
        ]
    )
    assert pa.commonalities(z[0], z[-1], theta=2.0) == [0]
    # 1 peaks at 4 (ends <= 0.5); 3 peaks at 2.2 with ends 0; 4 is weak everywhere but not inside
    assert pa.tangents(z, theta=2.0, margin=1.0) == [1, 3]
    assert pa.tangents(z, theta=2.0, margin=2.5) == [1]
    assert pa.tangents(z[[0, 2]], theta=2.0, margin=1.0) == []  # no interior step


# ---------------------------------------------------------------- paraphrase data


def test_content_words_ignore_function_words_and_inflection():
    assert tx.content_words("She packed her bags and was packing") == {"pack", "bag"}
    assert tx.shared_content_words("They planned the trips", "A plan for a trip") == {
        "plan",
        "trip",
    }


def test_shipped_paraphrases_share_no_content_word_with_their_originals():
    pairs = tx.load_paraphrases()
    assert len(pairs) >= 10
    originals = {p.id: p for p in load_pairs("vacation_deadline")}
    for orig, para in pairs:
        assert originals[orig.id] == orig
        assert para.source == f"paraphrase of {orig.id}"
        own = tx.content_words(orig.a) | tx.content_words(orig.b)
        assert not (tx.content_words(para.a) | tx.content_words(para.b)) & own
        assert 35 <= len(para.a.split()) <= 90 and 35 <= len(para.b.split()) <= 90


def _pairs_file(tmp_path, a: str, source: str = "paraphrase of vacation_deadline/000"):
    orig = load_pairs("vacation_deadline")[0]
    obj = {
        "id": "bad/000",
        "split": "train",
        "source": source,
        "a": a,
        "b": "Ingrid tidied graphs quietly.",
        "roles": [["dog", "graphs"], ["cat", "tidied"]],
    }
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(obj) + "\n", encoding="utf-8")
    return str(path), orig


def test_a_paraphrase_sharing_a_content_word_is_rejected(tmp_path):
    path, _ = _pairs_file(tmp_path, "A dog and a cat met at the station.")
    with pytest.raises(DatasetFormatError, match="shares content words.*station"):
        tx.load_paraphrases(path)
    path, _ = _pairs_file(tmp_path, "A dog and a cat met.", source="original")
    with pytest.raises(DatasetFormatError, match="paraphrase of"):
        tx.load_paraphrases(path)
    path, _ = _pairs_file(
        tmp_path, "A dog and a cat met.", source="paraphrase of vacation_deadline/999"
    )
    with pytest.raises(DatasetFormatError, match="does not exist"):
        tx.load_paraphrases(path)


# ---------------------------------------------------------------- interpolation on the tiny model


def _reader(model, hook, texts):
    basis = text_basis(model, texts, hook, 8)
    reader = pa.FeatureReader(basis, hook, tx.n_prefix(model), signed=True)
    return reader.calibrate(pa.doc_activity(model, reader, texts + [t[::-1] for t in texts]))


@pytest.mark.parametrize("hook", ["hook_embed", "blocks.1.hook_resid_post"])
def test_path_endpoints_reproduce_the_plain_runs_of_a_and_b(tiny_model, hook):
    pair = load_pairs("vacation_deadline")[0]
    last = f"blocks.{tiny_model.cfg.n_layers - 1}.hook_resid_post"
    reader = _reader(tiny_model, last, [pair.a, pair.b])
    ids_a, ids_b = tx.equal_length(tx.encode(tiny_model, pair.a), tx.encode(tiny_model, pair.b))
    t = pa.step_grid(3)
    for mode in pa.MODES:
        rec = pa.input_path(tiny_model, reader, ids_a, ids_b, hook, mode, t, 2.0, 1.0, top_k=3)
        assert max(rec["endpoint_max_abs_diff"]) <= 1e-4
    # at the last layer the logit lens is the model's output: the ends predict what A and B predict
    path = pa.lerp(*_acts(tiny_model, ids_a, ids_b, hook), t)
    read = pa.run_with_edit(tiny_model, ids_a, hook, lambda x: path, last, 3)
    with torch.no_grad():
        lens = tiny_model.unembed(tiny_model.ln_final(read))[:, -1]
        out_a = tiny_model(ids_a[None])[0, -1]
        out_b = tiny_model(ids_b[None])[0, -1]
    torch.testing.assert_close(lens[0], out_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lens[-1], out_b, atol=1e-4, rtol=1e-4)


def _acts(model, ids_a, ids_b, hook):
    return pa.cache_at(model, ids_a, [hook])[hook], pa.cache_at(model, ids_b, [hook])[hook]


def test_zero_relation_path_is_the_plain_run(tiny_model):
    pair = load_pairs("vacation_deadline")[1]
    read_hook = "blocks.3.hook_resid_post"
    reader = _reader(tiny_model, read_hook, [pair.a, pair.b])
    ids = tx.encode(tiny_model, pair.a)
    zero = torch.zeros(tiny_model.cfg.d_model)
    rec = pa.relation_path(
        tiny_model,
        reader,
        ids,
        "blocks.1.hook_resid_post",
        zero,
        zero,
        "slerp",
        pa.step_grid(3),
        2.0,
        1.0,
    )
    plain = reader.z(reader.activity(pa.cache_at(tiny_model, ids, [read_hook])[read_hook][None]))[0]
    for row in rec["z"]:
        torch.testing.assert_close(torch.tensor(row), plain, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="d_model"):
        pa.relation_path(
            tiny_model,
            reader,
            ids,
            "blocks.1.hook_resid_post",
            zero[:3],
            zero,
            "linear",
            pa.step_grid(2),
            2,
            1,
        )


def test_analyze_interpolation_reports_every_count_beside_its_controls(tiny_model):
    g = torch.Generator().manual_seed(1)
    d = tiny_model.cfg.d_model
    res = ip.analyze_interpolation(
        tiny_model,
        ["hook_embed"],
        read_hook="blocks.2.hook_resid_post",
        n_features=6,
        n_steps=3,
        modes=["slerp"],
        n_controls=2,
        n_reference=6,
        relation_a=torch.randn(d, generator=g),
        relation_b=torch.randn(d, generator=g),
        relation_hook="blocks.1.hook_resid_post",
        progress=False,
    )
    json.dumps(res)  # JSON-serialisable as written
    assert "reference" in res["basis"]["fit_on"]  # neither the main nor the control inputs
    (row,) = res["summary"]
    for what in ("commonalities", "tangents"):
        for kind in ip.CONTROLS:
            st = row[what][kind]
            assert len(st["control_counts"]) == 2 and 0 < st["p_control_ge"] <= 1
    main = [p for p in res["paths"] if p["kind"] == "main"]
    assert len(main) == 1 and len(main[0]["z"]) == 3 and len(main[0]["z"][0]) == 12  # 6 x (+, -)
    assert row["commonalities"]["shuffle"]["main"] == main[0]["n_commonalities"]
    assert res["relation"]["summary"][0]["commonalities"]["random_vectors"]["control_counts"]
    ab = res["abstract"]
    assert ab["n_abstract"] + ab["n_superficial"] == ab["n_commonalities"]
    assert ab["n_pairs"] == len(tx.load_paraphrases())
    assert set(interpolate_figures(res)) >= {"interpolate/counts", "interpolate/abstract"}


def test_interpolation_rejects_incompatible_hooks_and_bad_input(tiny_model):
    with pytest.raises(pa.IncompatibleHookError, match="not a complete residual-stream state"):
        ip.analyze_interpolation(
            tiny_model, ["blocks.1.hook_attn_out"], "a b c", "d e f", progress=False
        )
    with pytest.raises(pa.IncompatibleHookError, match="not a complete residual-stream state"):
        pa.residual_depth(
            tiny_model, "blocks.1.hook_resid_mid"
        )  # the bridge does not carry it forward
    with pytest.raises(pa.IncompatibleHookError, match="is not after the interpolation hook"):
        ip.analyze_interpolation(
            tiny_model,
            ["blocks.2.hook_resid_post"],
            read_hook="blocks.1.hook_resid_post",
            progress=False,
        )
    with pytest.raises(HookNameError, match="Unknown hook name"):
        ip.analyze_interpolation(tiny_model, ["blocks.1.hook_resid_psot"], progress=False)
    with pytest.raises(ValueError, match="n_steps must be >= 2"):
        ip.analyze_interpolation(tiny_model, n_steps=1, progress=False)
    with pytest.raises(ValueError, match="Unknown controls"):
        ip.analyze_interpolation(tiny_model, controls=["noise"], progress=False)
    with pytest.raises(ValueError, match="Unknown basis_fit 'corpus'; valid: reference, inputs"):
        ip.analyze_interpolation(tiny_model, basis_fit="corpus", progress=False)
    with pytest.raises(ValueError, match="both text_a and text_b"):
        ip.analyze_interpolation(tiny_model, text_a="only one", progress=False)
    with pytest.raises(ValueError, match="both relation_a and relation_b"):
        ip.analyze_interpolation(tiny_model, relation_a=torch.zeros(64), progress=False)
    with pytest.raises(ValueError, match="equal token counts"):
        pa.input_path(
            tiny_model,
            None,
            torch.ones(3, dtype=torch.long),
            torch.ones(4, dtype=torch.long),
            "hook_embed",
            "linear",
            pa.step_grid(2),
            2,
            1,
        )
    assert pa.residual_depth(tiny_model, "blocks.1.hook_resid_post") == pa.residual_depth(
        tiny_model, "blocks.2.hook_resid_pre"
    )


# ---------------------------------------------------------------- jacobian


def _ids(model, n: int = 12):
    return jac.encode_text(model, load_pairs("vacation_deadline")[2].a, n)


@pytest.mark.parametrize("metric", ["logprobs", "logit_diff"])
def test_jvp_equals_finite_difference_and_double_backward(tiny_model, metric):
    ids = _ids(tiny_model)
    head = dv.output_head(metric, (42, 1234))
    mask = dv.position_mask(len(ids), "last", 1)[None].expand(3, -1)
    f = dv.perturbed_fn(tiny_model, ids, "blocks.1.hook_resid_post", mask, head)
    v = random_unit_directions(
        3, tiny_model.cfg.d_model, torch.Generator().manual_seed(0), torch.float32
    )
    out, jv, how = dv.directional_derivative(f, v, "jvp")
    assert how == "jvp"
    _, jv_db, _ = dv.directional_derivative(f, v, "double_backward")
    _, jv_fd, _ = dv.directional_derivative(f, v, "finite_difference", eps=1e-2)
    torch.testing.assert_close(jv_db, jv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(jv_fd, jv, rtol=2e-2, atol=2e-2 * float(jv.abs().max()))
    assert float(jv.abs().max()) > 1e-3  # a derivative that is not trivially zero


def test_kv_cache_shortcut_equals_the_full_forward(tiny_model):
    ids = _ids(tiny_model)
    hook = "blocks.2.hook_resid_post"
    v = random_unit_directions(
        2, tiny_model.cfg.d_model, torch.Generator().manual_seed(1), torch.float32
    )
    mask = dv.position_mask(len(ids), "last", 1)[None].expand(2, -1)
    fast = dv.perturbed_fn(tiny_model, ids, hook, mask, dv.output_head("logprobs"))(3 * v)
    logits = []
    for row in v:  # plain hooked full forwards, one direction at a time
        with tiny_model.hooks(fwd_hooks=[(hook, lambda x, hook, r=row: _add_last(x, 3 * r))]):
            logits.append(tiny_model(ids[None])[0, -1])
    torch.testing.assert_close(
        fast, torch.log_softmax(torch.stack(logits), -1), atol=1e-4, rtol=1e-4
    )


def _add_last(x, r):
    out = x.clone()
    out[:, -1] += r
    return out


def test_jvp_matches_transformer_lens_jacobian_lens(tiny_model):
    v = random_unit_directions(
        1, tiny_model.cfg.d_model, torch.Generator().manual_seed(2), torch.float32
    )[0]
    text = load_pairs("vacation_deadline")[3].b
    res = jac.jlens_crosscheck(tiny_model, "blocks.1.hook_resid_post", text, v, max_tokens=10)
    assert res["applicable"] and res["tokens_match"]
    assert res["relative_error"] < 1e-4 and res["jlens_norm"] > 1e-3
    assert not jac.jlens_crosscheck(tiny_model, "blocks.3.hook_resid_post", text, v)["applicable"]


def test_response_classes_on_known_curves():
    steps = [0.1, 0.3, 1.0, 3.0]
    assert dv.classify_response([1.0, 0.99, 1.02, 0.95]) == "linear"
    assert dv.classify_response([math.tanh(s) / s for s in steps]) == "saturating"
    assert dv.classify_response([1 + s for s in steps]) == "accelerating"
    assert dv.classify_response([0.9, 0.4, -0.2, -0.5]) == "flip"
    assert dv.classify_response([1.0, 0.3, 1.9, 1.0]) == "nonmonotone"
    jv = torch.tensor([[1.0, -2.0, 0.5]])
    p = torch.tensor([[0.2, 0.3, 0.5]])
    torch.testing.assert_close(dv.response_ratio(0.5 * jv, jv, 0.5, p), torch.tensor([1.0]))
    torch.testing.assert_close(dv.response_ratio(-0.1 * jv, jv, 0.5, p), torch.tensor([-0.2]))
    torch.testing.assert_close(dv.fisher_norm(jv, p), (p * jv**2).sum(-1).sqrt())


def test_analyze_jacobian_ranks_directions_beside_random_ones(tiny_model):
    res = jac.analyze_jacobian(
        tiny_model,
        "blocks.1.hook_resid_post",
        [load_pairs("vacation_deadline")[0].a],
        fit_texts=[p.b for p in load_pairs("vacation_deadline")[:4]],
        n_directions=4,
        n_random=4,
        steps=(0.01, 0.1),
        max_tokens=16,
        progress=False,
    )
    json.dumps(res)
    sizes = [d["fisher_norm"] for d in res["directions"]]
    assert sizes == sorted(sizes, reverse=True) and [d["rank"] for d in res["directions"]] == [
        1,
        2,
        3,
        4,
    ]
    assert res["method"] == ["jvp"] and len(res["random"]["directions"]) == 4
    # a tiny step moves the output as the derivative predicts (breaks if J v is wrong)
    assert abs(res["smallest_step_ratio"]["singular_median"] - 1) < 0.05
    assert abs(res["smallest_step_ratio"]["random_median"] - 1) < 0.05
    counts = res["class_counts"]["singular"]["+"]
    assert sum(counts.values()) == 4
    assert set(jacobian_figures(res)) == {"jacobian/ranked", "jacobian/response"}


def test_jacobian_bad_input(tiny_model):
    hook = "blocks.1.hook_resid_post"
    with pytest.raises(ValueError, match="steps must be positive"):
        jac.analyze_jacobian(tiny_model, hook, ["a b c"], steps=(0.0, 1.0), progress=False)
    with pytest.raises(ValueError, match="Unknown metric"):
        jac.analyze_jacobian(tiny_model, hook, ["a b c"], metric="kl", progress=False)
    with pytest.raises(ValueError, match="target_tokens"):
        jac.analyze_jacobian(tiny_model, hook, ["a b c"], metric="logit_diff", progress=False)
    with pytest.raises(ValueError, match="one token each"):
        jac.analyze_jacobian(
            tiny_model,
            hook,
            ["a b c"],
            metric="logit_diff",
            target_tokens=(" yes", " antidisestablishment"),
        )
    with pytest.raises(ValueError, match="n_random must be >= 1"):
        jac.analyze_jacobian(tiny_model, hook, ["a b c"], n_random=0, progress=False)
    with pytest.raises(HookNameError):
        jac.analyze_jacobian(tiny_model, "blocks.9.hook_resid_post", ["a b c"], progress=False)
    ids = _ids(tiny_model)
    mask = dv.position_mask(len(ids), "all", 1)[None]
    f = dv.perturbed_fn(
        tiny_model, ids, "blocks.1.attn.hook_pattern", mask, dv.output_head("logprobs")
    )
    with pytest.raises(ValueError, match="d_model"):
        f(torch.zeros(1, tiny_model.cfg.d_model))
    with pytest.raises(ValueError, match="positions must be one of"):
        dv.position_mask(5, "first", 1)
    with pytest.raises(ValueError, match="out of range"):
        dv.position_mask(5, [7], 1)
    with pytest.raises(ValueError, match="Unknown method"):
        dv.directional_derivative(lambda d: d, torch.zeros(1, 2), "symbolic")


# ---------------------------------------------------------------- shape search


def _planted_parallelogram(n: int = 24, d: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g)
    v[5] = v[9] - v[2] + v[17]  # 5 - 9 = 17 - 2
    return v


def test_planted_parallelogram_is_found_first_and_beats_random():
    v = _planted_parallelogram()
    res = sh.search_by_shape(
        [{"type": "parallelogram", "slots": ["a", "b", "c", "d"]}], v, top_k=3, n_random=5, seed=0
    )
    best = res["results"][0]
    assert set(best["assignment"].values()) == {"f5", "f9", "f17", "f2"}
    a, b, c, d = (int(best["assignment"][s][1:]) for s in "abcd")
    torch.testing.assert_close(v[a] - v[b], v[c] - v[d], atol=1e-5, rtol=0)
    assert best["score"] > 1 - 1e-6
    assert res["random_search"]["max"] < best["score"] - 0.1
    assert res["random_tuples"]["max"] < best["score"]
    assert res["random_search"]["p_value"] == pytest.approx(1 / 6)
    assert len({frozenset(r["assignment"].values()) for r in res["results"]}) == 3  # distinct sets


def test_planted_order_orthogonal_to_a_fixed_vector_is_found_first():
    g = torch.Generator().manual_seed(3)
    labels = [c for c in ("one", "two", "three") for _ in range(8)]
    codes = torch.randn(24, 12, generator=g)
    level = torch.tensor([float(["one", "two", "three"].index(x)) for x in labels])
    codes[:, 4] = -(level + 0.1 * torch.randn(24, generator=g))  # decreasing with the number
    codes[:, 7] = level + 0.1 * torch.randn(
        24, generator=g
    )  # increasing, but aligned with `gender`
    vectors = torch.randn(12, 16, generator=g)
    gender = vectors[7].clone()
    vectors[4] -= (vectors[4] @ gender) / (gender @ gender) * gender  # 4 is orthogonal to gender
    spec = [
        {"type": "ordered", "slot": "count", "order": ["one", "two", "three"]},
        {"type": "orthogonal", "slot": "count", "to": ["gender"]},
    ]
    res = sh.search_by_shape(
        spec, vectors, codes=codes, labels=labels, fixed={"gender": gender}, n_random=5
    )
    assert res["results"][0]["assignment"] == {"count": "f4"}
    assert res["results"][0]["per_constraint"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert res["random_search"]["max"] < res["best_score"]
    up = dict(spec[0], direction="increasing")
    res_up = sh.search_by_shape([up], codes=codes, labels=labels, n_random=2)
    assert res_up["results"][0]["assignment"] == {"count": "f7"}


def test_order_scores_count_ordered_cross_group_pairs():
    codes = torch.tensor([[0.0], [2.0], [1.0], [3.0], [1.0]])
    labels = ["a", "a", "b", "b", "c"]

    # a<b: (0,1) (0,3) (2,3) of 4; a<c: (0,1) of 2; b<c: (1,1) a tie (1/2), (3,1) not: 4.5 of 8
    def score(order, direction):
        return float(sh.order_scores(codes, labels, order, direction)[0])

    assert score(["a", "b", "c"], "increasing") == pytest.approx(4.5 / 8)
    assert score(["a", "b", "c"], "decreasing") == pytest.approx(3.5 / 8)
    assert score(["c", "b", "a"], "increasing") == pytest.approx(3.5 / 8)
    assert score(["a", "b", "c"], "either") == pytest.approx(4.5 / 8)


def test_chunked_search_equals_brute_force():
    g = torch.Generator().manual_seed(5)
    v = torch.randn(7, 5, generator=g)
    spec = [
        {"type": "parallelogram", "slots": ["a", "b", "c", "d"]},
        {"type": "orthogonal", "slots": ["a", "e"]},
        {"type": "aligned", "slot": "e", "to": ["z"], "weight": 0.5},
    ]
    fixed = {"z": torch.randn(5, generator=g)}
    cons = sh.parse_constraints(spec, fixed=["z"])
    tab = sh._tables(cons, v.double(), None, None, fixed)
    slots = sh.slot_order(cons)
    brute = max(
        (sh.score_assignment(cons, tab, dict(zip(slots, p, strict=True)))["total"], p)
        for p in itertools.permutations(range(7), len(slots))
    )
    for max_grid in (7**5, 7**3):  # one grid; the first two slots enumerated in Python
        (score, assign), *_ = sh._search(cons, tab, 7, 1, max_grid)
        assert score == pytest.approx(brute[0], abs=1e-9)
        assert sh.score_assignment(cons, tab, dict(zip(slots, assign, strict=True)))[
            "total"
        ] == pytest.approx(score)


def test_spec_accepts_omegaconf_lists():
    from omegaconf import OmegaConf

    spec = OmegaConf.create([{"type": "orthogonal", "slots": ["a", "b"]}])
    (c,) = sh.parse_constraints(spec)
    assert c.slots == ("a", "b") and c.type == "orthogonal"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ([{"type": "triangle", "slots": ["a"]}], "unknown type 'triangle'; valid types"),
        ([{"type": "parallelogram", "slots": ["a", "b", "c"]}], "exactly 4 slots"),
        ([{"type": "orthogonal", "slots": ["a"]}], "2\\+ slots, or slots plus 'to"),
        (
            [{"type": "orthogonal", "slots": ["a", "b"], "colour": "red"}],
            "unknown keys \\['colour'\\]",
        ),
        (
            [{"type": "orthogonal", "slots": ["a"], "to": ["nowhere"]}],
            "neither slots nor fixed vectors",
        ),
        ([{"type": "orthogonal", "slots": ["a", "a"]}], "repeat a name"),
        ([{"type": "aligned", "slots": ["a", "b"], "weight": 0}], "weight must be a number > 0"),
        (
            [{"type": "ordered", "slot": "n", "order": ["one", "two"]}],
            "needs codes and input labels",
        ),
        ([{"type": "parallelogram"}], "exactly one of 'slot' or 'slots'"),
        ([], "non-empty list of dicts"),
        (["parallelogram"], "expected a dict"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, match):
    with pytest.raises(sh.ShapeSpecError, match=match):
        sh.parse_constraints(spec)


def test_bad_search_inputs_say_what_is_wrong():
    codes = torch.randn(4, 3)
    spec = [{"type": "ordered", "slot": "n", "order": ["x", "q"]}]
    with pytest.raises(sh.ShapeSpecError, match="not input labels"):
        sh.search_by_shape(spec, codes=codes, labels=["x", "x", "y", "y"])
    with pytest.raises(sh.ShapeSpecError, match="one label per row"):
        sh.search_by_shape(spec, codes=codes, labels=["x"])
    with pytest.raises(sh.ShapeSpecError, match="need candidate vectors"):
        sh.search_by_shape(
            [{"type": "orthogonal", "slots": ["a", "b"]}], codes=codes, labels=list("xxyy")
        )
    with pytest.raises(sh.ShapeSpecError, match="at least 4 candidates"):
        sh.search_by_shape([{"type": "parallelogram", "slots": list("abcd")}], torch.randn(3, 5))
    with pytest.raises(sh.ShapeSpecError, match="vectors give 5 candidates but codes give 3"):
        sh.search_by_shape(spec, torch.randn(5, 2), codes=codes, labels=list("xxyy"))


# ---------------------------------------------------------------- run(cfg, ctx) adapters


def _ctx(model, hook: str):
    """A RelationsContext with synthetic concept sets (class means are what the adapters read)."""
    from analoglock.relations.context import ConceptActs, RelationsContext

    g = torch.Generator().manual_seed(7)
    d = model.cfg.d_model

    def cset(name, classes, n=6):
        acts = {
            hook: {
                c: torch.randn(n, d, generator=g) + 3 * torch.randn(d, generator=g) for c in classes
            }
        }
        return ConceptActs(
            name, tuple(classes), [f"{name}/{i}" for i in range(n)], ["train"] * n, acts
        )

    concepts = {
        "royalty": cset("royalty", ["king", "queen", "man", "woman"]),
        "gender": cset("gender", ["male", "female"]),
        "numbers": cset("numbers", ["one", "two", "three"]),
    }
    return RelationsContext(model=model, hooks=[hook], concepts=concepts, seed=3)


def test_shape_run_searches_class_means_and_basis_features(tiny_model):
    ctx = _ctx(tiny_model, "blocks.1.hook_resid_post")
    res = sh.run({"n_random": 3, "top_k": 2}, ctx)
    json.dumps(res)
    par = res["searches"]["parallelogram_of_concepts"]
    assert par["n_candidates"] == 9 and len(par["results"]) == 2
    names = set(par["results"][0]["assignment"].values())
    assert len(names) == 4 and all(":" in n for n in names)
    num = res["searches"]["ordered_numbers"]
    assert [c["type"] for c in num["constraints"]] == ["ordered", "orthogonal"]
    assert len(num["random_search"]["best_scores"]) == 3
    with pytest.raises(sh.ShapeSpecError, match="candidates must be"):
        sh.run({"searches": {"x": {"candidates": "words", "constraints": []}}}, ctx)


def test_jacobian_and_interpolate_run_from_config(tiny_model):
    ctx = _ctx(tiny_model, "blocks.1.hook_resid_post")
    jr = jac.run(
        {"n_directions": 2, "n_random": 2, "steps": [0.05], "texts": ["The cat sat down."]}, ctx
    )
    assert jr["hook"] == "blocks.1.hook_resid_post" and len(jr["directions"]) == 2
    cfg = {
        "hooks": ["hook_embed"],
        "read_hook": "blocks.2.hook_resid_post",
        "n_features": 4,
        "n_steps": 3,
        "modes": ["linear"],
        "controls": ["shuffle"],
        "n_controls": 1,
        "n_reference": 3,
        "paraphrases": False,
        "relations": ["gender:male-female", "royalty:king-queen"],
    }
    res = ip.run(cfg, ctx)
    assert "abstract" not in res
    rel = res["relation"]
    assert rel["hook"] == "blocks.1.hook_resid_post" and rel["names"] == cfg["relations"]
    means = ctx.concept("gender").means("blocks.1.hook_resid_post")
    assert rel["norms"][0] == pytest.approx(
        float((means["male"] - means["female"]).norm()), rel=1e-5
    )
    with pytest.raises(ValueError, match="has no class 'queen'"):
        ip.run(dict(cfg, relations=["gender:male-queen", "royalty:king-queen"]), ctx)


def test_abstract_rate_difference_is_paired_over_pairs():
    from analoglock.relations.interpolate import rate_difference_interval

    def row(abstract: int, superficial: int, control: int) -> dict:
        return {"abstract": ["f"] * abstract, "superficial": ["g"] * superficial,
                "abstract_under_control": ["h"] * control}  # fmt: skip

    same = rate_difference_interval([row(3, 1, 1)] * 10)
    assert same["abstract_rate_minus_control"] == 0.5
    assert same["abstract_rate_minus_control_ci95"] == [0.5, 0.5]  # no variation between pairs
    # half the pairs carry the whole excess: the point is the pooled rate, the interval spans it
    mixed = rate_difference_interval([row(4, 0, 0)] * 5 + [row(2, 2, 2)] * 5)
    lo, hi = mixed["abstract_rate_minus_control_ci95"]
    # the difference is (type-A pairs drawn) / 10, Binomial(10, 1/2) / 10: 95% between 0.2 and 0.8
    assert mixed["abstract_rate_minus_control"] == 0.5 and (lo, hi) == (0.2, 0.8)
    none = rate_difference_interval([row(1, 1, 1)] * 6)
    assert none["abstract_rate_minus_control_ci95"] == [0.0, 0.0]
