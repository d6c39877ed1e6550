"""Relations between concepts: exact math on planted vectors, probes, causal consistency on the tiny
model, bad input, and the analoglock-relations CLI end to end (report rendered in Chromium)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from analoglock.relations import ANALYSES, ConceptActs, RelationsContext
from analoglock.relations.algebra import RelationSpec, relation_algebra
from analoglock.relations.anomalies import hoyer, rank, robust_z
from analoglock.relations.concepts import (
    ConceptPositionError,
    add_at_concept,
    balance_classes,
    forward_concepts,
    harvest_concepts,
)
from analoglock.relations.recursive import analogy, level1_quads, level2_quads, parse_families
from analoglock.relations.vectors import concept_vectors, fit_probe
from analoglock.stats import bh_adjust

SPLITS = ["train" if i % 20 < 14 else "validation" if i % 20 < 17 else "test" for i in range(48)]
HOOK = "h"


def planted_set(name, classes, offsets, n=48, d=64, noise=1.0, seed=0, content=3.0) -> ConceptActs:
    """Items with a shared random content row per item, plus a fixed offset per class, plus noise."""
    g = torch.Generator().manual_seed(seed)
    content = torch.randn(n, d, generator=g) * content
    acts = {
        c: content + off + noise * torch.randn(n, d, generator=g)
        for c, off in zip(classes, offsets, strict=True)
    }
    return ConceptActs(
        name, tuple(classes), [f"{name}/{i:03d}" for i in range(n)], SPLITS[:n], {HOOK: acts}
    )


def unit(d, k):
    v = torch.zeros(d)
    v[k] = 1.0
    return v


# ---------------------------------------------------------------- algebra


def test_planted_alignment_and_orthogonality_get_the_right_verdicts():
    d = 64
    e0, e1 = unit(d, 0), unit(d, 1)
    sets = {
        "gender": planted_set("gender", ["male", "female"], [3 * e0, -3 * e0], seed=1),
        "royalty": planted_set("royalty", ["king", "queen"], [3 * e0 + 0.5 * e1, -3 * e0], seed=2),
        "emotion": planted_set("emotion", ["angry", "calm"], [3 * e1, -3 * e1], seed=3),
    }
    res = relation_algebra(sets, HOOK, n_null=300, n_random=2000, seed=0)
    pairs = {(p["a"], p["b"]): p for p in res["cosines"]["pairs"]}
    aligned = pairs[("gender:male-female", "royalty:king-queen")]
    assert aligned["cos"] > 0.9 and aligned["p_shuffled"] < 0.01 and aligned["verdict"] == "aligned"
    ortho = pairs[("gender:male-female", "emotion:angry-calm")]
    assert (
        abs(ortho["cos"]) < 0.1 and ortho["p_shuffled"] > 0.05 and ortho["verdict"] == "orthogonal"
    )
    # Norms: planted relations are far above the shuffled-label null.
    assert all(n["p"] < 0.01 for n in res["norms"])


def test_random_relations_have_roughly_uniform_p_values():
    d = 64
    ps, verdicts = [], []
    for s in range(12):
        sets = {
            "a": planted_set("a", ["x", "y"], [torch.zeros(d), torch.zeros(d)], seed=100 + s),
            "b": planted_set("b", ["u", "v"], [torch.zeros(d), torch.zeros(d)], seed=200 + s),
        }
        res = relation_algebra(sets, HOOK, n_null=100, n_random=100, seed=s)
        pair = res["cosines"]["pairs"][0]
        ps.append(pair["p_shuffled"])
        verdicts.append(pair["verdict"])
    ps = torch.tensor(ps)
    assert 0.25 < float(ps.mean()) < 0.75  # uniform has mean 0.5
    assert verdicts.count("orthogonal") >= 10
    assert int((ps < 0.05).sum()) <= 2


def test_bh_adjust_matches_hand_computation():
    p = torch.tensor([0.01, 0.04, 0.03, 0.5], dtype=torch.float64)
    # sorted 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.06, 0.0533, 0.5 -> cummin from the right: 0.04, .0533, .0533, .5
    torch.testing.assert_close(
        bh_adjust(p), torch.tensor([0.04, 0.16 / 3, 0.16 / 3, 0.5], dtype=torch.float64)
    )


def test_relation_spec_parse_errors():
    assert RelationSpec.parse("gender:male-female").label == "gender:male-female"
    with pytest.raises(ValueError, match="set:a-b"):
        RelationSpec.parse("male-female")


# ---------------------------------------------------------------- probes and concept vectors


def test_probe_separates_separable_data_and_recovers_the_direction():
    g = torch.Generator().manual_seed(0)
    d = 32
    w = torch.randn(d, generator=g)
    w /= w.norm()
    x = torch.randn(400, d, generator=g)
    y = (x @ w > 0).long()
    x = x + 0.8 * (2 * y[:, None] - 1) * w  # a margin
    probe = fit_probe(x[:300], y[:300], 2, steps=200)
    assert float((probe.predict(x[300:]) == y[300:]).double().mean()) == 1.0
    assert float(probe.direction(1, 0) @ w) > 0.9


def test_concept_vectors_beat_their_nulls_only_when_there_is_a_concept():
    d = 64
    ca = planted_set("s", ["a", "b"], [2 * unit(d, 3), -2 * unit(d, 3)], seed=4, content=0.5)
    res = concept_vectors(ca, HOOK, "a", "b", n_null=20, seed=0)
    for m in ("mean_diff", "probe", "svd"):
        r = res["methods"][m]
        # the probe fits 64 dims from 72 rows, so it overfits a little; the other two do not
        assert r["heldout_accuracy"] >= (0.8 if m == "probe" else 1.0) and r["p_random"] < 0.05, m
        assert r["p_shuffled"] < 0.05 and abs(r["shuffled_labels"]["mean"] - 0.5) < 0.15, m
    assert res["cosine_between_methods"]["mean_diff~svd"] > 0.9
    null = planted_set("n", ["a", "b"], [torch.zeros(d), torch.zeros(d)], seed=5)
    r0 = concept_vectors(null, HOOK, "a", "b", n_null=30, seed=0, methods=("mean_diff",))
    assert r0["methods"]["mean_diff"]["p_shuffled"] > 0.05


# ---------------------------------------------------------------- recursive


def test_planted_parallelogram_is_solved_and_baselines_are_not():
    d = 64
    g = torch.Generator().manual_seed(0)
    gender, royal = 4 * unit(d, 0), 4 * unit(d, 1)
    pts = {"r.man": -(gender + royal) / 2}
    pts["r.woman"] = pts["r.man"] + gender
    pts["r.king"] = pts["r.man"] + royal
    pts["r.queen"] = pts["r.man"] + royal + gender
    # Decoys close to every corner: nearer to it than the true answer is, so "no offset" and a
    # random offset of the right length land on decoys, and only the real offset finds the answer.
    for name in list(pts):
        for k in range(3):
            z = torch.randn(d, generator=g)
            pts[f"x.{name}{k}"] = pts[name] + 2.0 * z / z.norm()
    fams = parse_families(
        {
            "gender": ["r.man>r.woman", "r.king>r.queen"],
            "royal": ["r.man>r.king", "r.woman>r.queen"],
        }
    )
    res = analogy(pts, level1_quads(fams), n_random=100, seed=0, center=False)
    assert res["n"] == 4 and res["accuracy"] == 1.0
    assert res["no_offset_accuracy"] == 0.0
    assert res["random_offset_accuracy_mean"] < 0.5 and res["p_random"] < 0.05


def test_level2_arithmetic_progression():
    d = 64
    g = torch.Generator().manual_seed(1)
    step = 3 * unit(d, 5)
    pts = {f"n.{k}": k * step + 0.05 * torch.randn(d, generator=g) for k in range(1, 6)}
    pts.update({f"x.{k}": torch.randn(d, generator=g) * 3 for k in range(6)})
    fams = parse_families(
        {
            "succ": ["n.1>n.2", "n.2>n.3", "n.3>n.4", "n.4>n.5"],
            "plus2": ["n.1>n.3", "n.2>n.4", "n.3>n.5"],
        }
    )
    quads = level2_quads(fams)
    assert len(quads) == 6 and all(q[0][0].split(">")[0] == q[0][1].split(">")[0] for q in quads)
    from analoglock.relations.recursive import relation_groups, relation_points

    res = analogy(
        relation_points(fams, pts), quads, n_random=50, seed=0, groups=relation_groups(fams)
    )
    assert res["accuracy"] == 1.0
    # Without the offset, the nearest relation to a successor is another successor: wrong family.
    assert res["no_offset_accuracy"] == 0.0


def test_family_members_must_be_pairs():
    with pytest.raises(ValueError, match="set.a>set.b"):
        parse_families({"f": ["gender.male-gender.female"]})


# ---------------------------------------------------------------- anomalies


def test_robust_z_and_hoyer_and_ranking():
    null = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    # median 2, MAD 1 -> z = (5 - 2) / 1.4826
    assert robust_z(5.0, null) == pytest.approx(3 / 1.4826)
    assert float(hoyer(torch.tensor([0.0, 0.0, 5.0, 0.0]))) == pytest.approx(1.0)
    assert float(hoyer(torch.ones(9))) == pytest.approx(0.0, abs=1e-6)
    ranked = rank([{"robust_z": 1.0}, {"robust_z": -7.0}, {"robust_z": 3.0}])
    assert [r["robust_z"] for r in ranked] == [-7.0, 3.0, 1.0] and ranked[0]["rank"] == 1


# ---------------------------------------------------------------- bad input


def test_unequal_classes_warn_and_balance(caplog):
    g = torch.Generator().manual_seed(0)
    rows = {
        "a": [(f"i{k}", torch.zeros(2)) for k in range(40)],
        "b": [(f"i{k}", torch.ones(2)) for k in range(10)],
    }
    with caplog.at_level(logging.WARNING):
        out = balance_classes(rows, g, "toy")
    assert "unequal class sizes" in caplog.text
    assert len(out["a"]) == len(out["b"]) == 10
    with pytest.raises(ValueError, match="one class"):
        balance_classes({"a": rows["a"]}, g, "toy")


def test_one_class_set_is_refused(tiny_model, tmp_path):
    path = tmp_path / "solo.jsonl"
    path.write_text(
        json.dumps(
            {
                "id": "solo/000",
                "split": "train",
                "template": "The {x} sat.",
                "fills": {"cat": "cat"},
            }
        )
        + "\n"
    )
    with pytest.raises(ValueError, match="one class"):
        harvest_concepts(tiny_model, str(path), ["blocks.0.hook_resid_post"])


def test_missing_concept_position_is_a_clear_error(tiny_model):
    # max_length=3 cuts every sentence before its concept word.
    with pytest.raises(ConceptPositionError, match="no token at the concept position"):
        harvest_concepts(tiny_model, "gender", ["blocks.0.hook_resid_post"], max_length=3)


def test_read_hook_before_edit_hook_is_refused(tiny_model):
    from analoglock.data import load_documents

    docs = load_documents("gender", limit=2)
    with pytest.raises(ValueError, match="Incompatible hooks"):
        forward_concepts(
            tiny_model,
            docs,
            ["blocks.0.hook_resid_post"],
            edit_hook="blocks.2.hook_resid_post",
            edit=add_at_concept(torch.zeros(64)),
        )


def test_unequal_harvest_directory_is_balanced_by_shared_items(tiny_model, tmp_path, caplog):
    from analoglock.activations import harvest_to_disk
    from analoglock.data import concept_documents, load_concepts
    from analoglock.positions import SpanTokens
    from analoglock.relations.concepts import concepts_from_store

    docs = [
        d
        for d in concept_documents(load_concepts("gender"))
        if not (d.meta["class"] == "female" and int(d.meta["item"][-3:]) >= 30)
    ]
    hook = "blocks.0.hook_resid_post"
    harvest_to_disk(tiny_model, docs, [hook], tmp_path, positions=SpanTokens(), progress=False)
    with caplog.at_level(logging.WARNING):
        ca = concepts_from_store(tmp_path, "last", tiny_model)
    assert "unequal class sizes" in caplog.text and ca.n_items == 30
    assert ca.item_ids == [f"gender/{i:03d}" for i in range(30)]
    # Matched rows: item 1 of each class is the king / queen sentence.
    direct = harvest_concepts(tiny_model, "gender", [hook])
    torch.testing.assert_close(
        ca.class_acts(hook, "female"), direct.class_acts(hook, "female")[:30], atol=1e-4, rtol=1e-4
    )


# ---------------------------------------------------------------- tiny model: causal consistency


@pytest.fixture(scope="module")
def tiny_sets(tiny_model):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    return {n: harvest_concepts(tiny_model, n, hooks) for n in ("gender", "emotion")}


def test_forward_without_edit_equals_the_harvest_and_an_edit_is_exact(tiny_model, tiny_sets):
    ca = tiny_sets["gender"]
    h = "blocks.1.hook_resid_post"
    clean = forward_concepts(tiny_model, ca.docs, [h], "last")[h]
    torch.testing.assert_close(clean[0::2], ca.class_acts(h, "male"), atol=1e-4, rtol=1e-4)
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    # Edit and read at the same hook: the read rows move by exactly v.
    edited = forward_concepts(tiny_model, ca.docs[:6], [h], "last", h, add_at_concept(v))[h]
    torch.testing.assert_close(edited - clean[:6], v.expand(6, -1), atol=1e-4, rtol=1e-4)


def test_separability_at_the_edit_hook_equals_the_linear_prediction(tiny_model, tiny_sets):
    from analoglock.relations.separability import Contrast, contrast_vector, separability

    h = "blocks.1.hook_resid_post"
    cons = [Contrast("gender", "male", "female"), Contrast("emotion", "angry", "calm")]
    res = separability(tiny_model, tiny_sets, h, h, cons, scale=1.0, n_random=1, progress=False)
    S = torch.tensor(res["matrix"])
    # Read at the edit hook, readout_B moves by exactly (w_B / std_B) . v_A per unit push.
    from analoglock.relations.separability import _readout_probe

    for i, a in enumerate(cons):
        v = contrast_vector(tiny_sets[a.set], h, a)
        for j, b in enumerate(cons):
            ca = tiny_sets[b.set]
            rows = forward_concepts(tiny_model, ca.docs, [h], ca.pool)[h]
            probe, _, gap = _readout_probe(ca, rows, b, 100)
            w = (probe.weight[1] - probe.weight[0]) / probe.std
            assert float(S[i, j]) == pytest.approx(float(w @ v.double()) / gap, rel=1e-3, abs=1e-4)
    assert res["p"] is not None and all(0 < p <= 1 for row in res["p"] for p in row)


# ---------------------------------------------------------------- CLI end to end


def test_registry_names_every_analysis():
    assert set(ANALYSES) >= {"algebra", "separability", "hierarchy", "recursive", "anomalies"}
    ctx = RelationsContext(model=None, hooks=[], concepts={})
    with pytest.raises(KeyError, match="not harvested"):
        ctx.concept("animals")


def test_cli_end_to_end_on_the_tiny_model(tiny_dir, tmp_path):
    from hydra import compose, initialize_config_dir

    from analoglock.cli._conf import CONF_DIR
    from analoglock.cli.relations import main

    out = tmp_path / "rel"
    small = [
        "algebra.n_null=40",
        "algebra.n_random=200",
        "algebra.read_offset=1",
        "algebra.n_composite_random=1",
        "algebra.composites=[[gender:male-female,emotion:angry-calm]]",
        "separability.n_random=1",
        "separability.read_offset=1",
        "separability.contrasts=[gender:male-female,animals:lion-rest]",
        "hierarchy.n_null=10",
        "hierarchy.n_control=2",
        "hierarchy.top_k=2",
        "hierarchy.read_offset=1",
        "hierarchy.reference=[gender]",
        "hierarchy.upstream_offset=1",
        "recursive.n_null=40",
        "recursive.n_random=20",
        "anomalies.n_null=20",
        "anomalies.n_random=50",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(
            "relations",
            overrides=[
                "model=hf",
                f"model.spec={tiny_dir}",
                "hook=blocks.1.hook_resid_post",
                "concepts=[animals,gender,emotion]",
                f"out_dir={out}",
                "progress=false",
                # interpolate and jacobian have their own tests; shape proves the wiring
                "analyses=[algebra,separability,hierarchy,recursive,shape,anomalies]",
                *small,
            ],
        )
    before = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # tiny matmuls: thread hand-offs cost more than they save on a shared CPU
    try:
        main.__wrapped__(cfg)
    finally:
        torch.set_num_threads(before)
    data = json.loads((out / "relations.json").read_text())
    res = data["results"]
    assert list(res) == ["algebra", "separability", "hierarchy", "recursive", "shape", "anomalies"]
    alg = res["algebra"]["by_hook"]["blocks.1.hook_resid_post"]
    n = len(alg["relations"])
    assert n == 6 + 1 + 1 and len(alg["cosines"]["pairs"]) == n * (n - 1) // 2
    assert all(0 < p["p_shuffled"] <= 1 and p["verdict"] for p in alg["cosines"]["pairs"])
    assert res["anomalies"]["ranked"][0]["rank"] == 1
    assert res["hierarchy"]["by_hook"]["blocks.1.hook_resid_post"]["upstream"]["available"]
    assert set(data["meta"]["seconds"]) == set(res)
    html = out / "report.html"
    text = html.read_text()
    assert html.stat().st_size > 50_000 and "Relation cosines" in text and "Hierarchy" in text
    assert "shape/" in text  # shape search's figures, drawn by their module

    from tests.browser import is_blank, render_screenshot, require_chromium

    require_chromium()  # skips on a dev box without it; fails under CI (CI=true)
    png = render_screenshot(html, tmp_path / "report.png")
    assert not is_blank(png)


def test_cli_rejects_unknown_analysis(tiny_dir, tmp_path):
    from hydra import compose, initialize_config_dir

    from analoglock.cli._conf import CONF_DIR
    from analoglock.cli.relations import main

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(
            "relations",
            overrides=[
                "model=hf",
                f"model.spec={tiny_dir}",
                "hook=blocks.0.hook_resid_post",
                "concepts=[gender]",
                "analyses=[algebra,separabilty]",
                f"out_dir={tmp_path}",
            ],
        )
    with pytest.raises(ValueError, match="Did you mean 'separability'"):
        main.__wrapped__(cfg)
