"""Relations on the real SmolLM2 (layer 13): the gender relation of the gender set points the way
royalty's man->woman and king->queen do, beyond shuffled labels and random directions of the space;
the gender probe generalises to held-out items; the royalty/gender parallelograms beat baselines."""

from __future__ import annotations

from analoglock.relations.algebra import RelationSpec, relation_algebra
from analoglock.relations.concepts import harvest_concepts
from analoglock.relations.recursive import recursive
from analoglock.relations.vectors import concept_vectors

HOOK = "blocks.13.hook_resid_post"


def test_gender_relations_align_and_analogies_beat_baselines(smollm2):
    sets = {n: harvest_concepts(smollm2, n, [HOOK]) for n in ("gender", "royalty")}
    specs = [
        RelationSpec("gender", "male", "female"),
        RelationSpec("royalty", "man", "woman"),
        RelationSpec("royalty", "king", "queen"),
    ]
    res = relation_algebra(sets, HOOK, specs, n_null=200, n_random=1000, seed=0)
    pairs = {(p["a"], p["b"]): p for p in res["cosines"]["pairs"]}
    mw = pairs[("gender:male-female", "royalty:man-woman")]
    assert mw["verdict"] == "aligned" and mw["cos"] > mw["space_random_abs_cos_q95"]
    kq = pairs[("gender:male-female", "royalty:king-queen")]
    assert kq["cos"] > 0.3 and kq["p_shuffled_normal"] < 0.01 and kq["p_isotropic"] < 0.01
    cv = concept_vectors(sets["gender"], HOOK, "male", "female", n_null=50, methods=("mean_diff",))
    m = cv["methods"]["mean_diff"]
    assert m["heldout_accuracy"] >= 0.8 and m["p_shuffled"] < 0.05 and m["p_random"] < 0.05
    families = {
        "gender": [
            "gender.male>gender.female",
            "royalty.king>royalty.queen",
            "royalty.man>royalty.woman",
        ],
        "royal": ["royalty.man>royalty.king", "royalty.woman>royalty.queen"],
    }
    lv1 = recursive(sets, HOOK, families, n_null=50, n_random=100, seed=0)["level1"]
    assert lv1["n"] == 8 and lv1["accuracy"] >= 0.75
    assert (
        lv1["accuracy"] > lv1["random_offset_accuracy_mean"]
        and lv1["accuracy"] > lv1["no_offset_accuracy"]
    )
