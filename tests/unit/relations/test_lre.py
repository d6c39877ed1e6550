"""Relations as operators (LRE): the benchmark's files and their checks, the forward passes and
Jacobians (predicted effects equal measured ones), the operators' math, and one relation run end
to end on the tiny random model."""

from __future__ import annotations

import json

import pytest
import torch

from analoglock.relations.lre_data import (
    RelationDataError,
    RelationSample,
    available_relations,
    check_samples,
    encode_prompt,
    load_relation,
    make_prompt,
    object_token,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def write_relation(tmp_path, samples, templates=("The capital of {} is",), name="toy"):
    """A user relation file in the benchmark's format."""
    path = tmp_path / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "name": name,
                "prompt_templates": list(templates),
                "prompt_templates_zs": [],
                "properties": {"relation_type": "factual", "domain_name": "x", "range_name": "y"},
                "samples": [{"subject": s, "object": o} for s, o in samples],
            }
        )
    )
    return path


# ---------------------------------------------------------------- data


def test_the_shipped_benchmark_has_39_relations_and_decodes_escaped_objects():
    assert len(available_relations("factual")) == 26
    assert len(available_relations("linguistic")) == 6 and len(available_relations("bias")) == 7
    rel = load_relation("country_capital_city")
    assert rel.kind == "factual" and rel.template() == "The capital city of {} is"
    objects = {s.object for s in rel.samples}
    assert "Brasília" in objects and not any("\\u" in o for o in objects)
    assert load_relation("factual/country_capital_city").samples == rel.samples
    with pytest.raises(FileNotFoundError, match="country_capital_city"):
        load_relation("country_capitol_city")


def test_a_user_file_loads_and_repeated_subjects_keep_their_first_object(tmp_path):
    path = write_relation(tmp_path, [("France", "Paris"), ("Peru", "Lima"), ("France", "Lyon")])
    rel = load_relation(path)
    assert rel.name == "toy" and rel.n_duplicates == 1
    assert rel.samples == (RelationSample("France", "Paris"), RelationSample("Peru", "Lima"))


def test_a_template_without_its_slot_is_an_error_naming_the_relation(tmp_path):
    path = write_relation(tmp_path, [("France", "Paris")], templates=("The capital is",))
    with pytest.raises(RelationDataError, match=r"'toy'.*'The capital is'.*exactly one"):
        load_relation(path)


def test_an_empty_object_is_an_error_naming_the_relation_and_the_sample(tmp_path):
    path = write_relation(tmp_path, [("France", "Paris"), ("Peru", "  ")])
    with pytest.raises(
        RelationDataError, match=r"'toy', sample 1 \(subject 'Peru'\): empty object"
    ):
        load_relation(path)


def test_prompts_are_the_other_samples_then_the_query_and_the_subject_token_is_its_last(
    tiny_model,
):
    ex = [RelationSample("France", "Paris"), RelationSample("United Kingdom", "London")]
    text, end = make_prompt("The capital of {} is", "United Kingdom", ex)
    assert text == "The capital of France is Paris\nThe capital of United Kingdom is"
    assert text[:end].endswith("United Kingdom")
    p = encode_prompt(tiny_model.tokenizer, 1, text, end, "toy", "United Kingdom")
    assert p.ids[0] == 1 and tiny_model.tokenizer.decode([p.ids[p.subject_index]]) == " Kingdom"
    assert p.suffix_len == 2  # " Kingdom", " is"


def test_a_subject_missing_from_its_prompt_is_an_error_naming_it(tiny_model):
    with pytest.raises(RelationDataError, match=r"'toy'.*'Spain'.*does not occur"):
        encode_prompt(tiny_model.tokenizer, 1, "The capital of France is", 22, "toy", "Spain")


def test_objects_that_tokenize_to_nothing_are_named_and_dropped_unless_strict(tiny_model):
    tok = tiny_model.tokenizer
    assert tok.decode([object_token(tok, "toy", RelationSample("x", "Paris"))]) == " Paris"
    rel = load_relation("presidents_birth_year")  # " 1732" starts with a bare " " token here
    with pytest.raises(RelationDataError, match=r"'presidents_birth_year', sample .*names nothing"):
        check_samples(rel, tok, 1, rel.template(), strict=True)
    checked = check_samples(rel, tok, 1, rel.template(), strict=False)
    assert not checked.samples and len(checked.dropped) == len(rel.samples)


# ---------------------------------------------------------------- forward passes


def _prompts(model, n=4):
    from analoglock.relations.lre import prompts_for

    rel = load_relation("country_capital_city")
    ex = list(rel.samples[:3])
    return rel, prompts_for(model, rel, rel.template(), list(rel.samples[3 : 3 + n]), ex)


def test_states_with_a_shared_cache_equal_a_plain_forward_and_decode_gives_the_logits(tiny_model):
    from analoglock.relations.lre_model import decode, layer_hook, prompt_states

    _, prompts = _prompts(tiny_model)
    H, Z = prompt_states(tiny_model, prompts, [1, 2])
    for i, p in enumerate(prompts):
        ids = torch.tensor(p.ids)[None]
        with torch.no_grad():
            logits, cache = tiny_model.run_with_cache(ids, names_filter=lambda n: "resid_post" in n)
        torch.testing.assert_close(
            H[1][i], cache[layer_hook(1)][0, p.subject_index], atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(Z[i], cache[layer_hook(3)][0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            decode(tiny_model, Z[i : i + 1])[0], logits[0, -1], atol=1e-3, rtol=1e-3
        )


def test_the_jacobian_predicts_the_measured_change_and_agrees_with_forward_mode(tiny_model):
    from analoglock.relations.lre_model import SubjectFunction

    _, prompts = _prompts(tiny_model, 1)
    f = SubjectFunction(tiny_model, prompts[0], [1, 2])
    d = tiny_model.cfg.d_model
    z0, h, J = f.jacobian_rows(torch.eye(d))
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    eps = 1e-3 * float(h[1].norm())
    with torch.no_grad():
        plus = f(eps * v, torch.zeros(d))[0]
        minus = f(-eps * v, torch.zeros(d))[0]
    measured = (plus - minus) / (2 * eps)
    torch.testing.assert_close(
        J[1] @ v, measured, atol=2e-3 * float(measured.abs().max()), rtol=0.02
    )
    torch.testing.assert_close(f.jvp(2, v[None])[0], J[2] @ v, atol=1e-4, rtol=1e-3)
    assert torch.equal(f(torch.zeros(d), torch.zeros(d))[0].float(), z0)


def test_an_edit_of_zero_is_a_no_op_and_an_edit_equals_the_hooked_forward(tiny_model):
    from analoglock.relations.lre_model import edited_logits, layer_hook

    _, prompts = _prompts(tiny_model, 1)
    p = prompts[0]
    d = tiny_model.cfg.d_model
    delta = torch.randn(2, d) * 0.5
    delta[0] = 0
    logits = edited_logits(tiny_model, p, {1: delta, 2: torch.zeros(2, d)})

    def add(x, hook):
        x = x.clone()
        x[0, p.subject_index] += delta[1]
        return x

    with torch.no_grad():
        plain = tiny_model(torch.tensor(p.ids)[None])[0, -1]
        hooked = tiny_model.run_with_hooks(
            torch.tensor(p.ids)[None], fwd_hooks=[(layer_hook(1), add)]
        )[0, -1]
    torch.testing.assert_close(logits[0], plain, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(logits[1], hooked, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------- operators


def test_the_lre_is_beta_w_h_plus_b_at_every_rank_and_its_full_inverse_undoes_w():
    from analoglock.relations.lre_ops import lre_from_weight

    g = torch.Generator().manual_seed(0)
    W, b, h = (
        torch.randn(8, 8, generator=g),
        torch.randn(8, generator=g),
        torch.randn(3, 8, generator=g),
    )
    lre = lre_from_weight(W, b, beta=2.0)
    torch.testing.assert_close(lre(h), 2.0 * h @ W.T + b, atol=1e-4, rtol=1e-4)
    U, S, Vh = torch.linalg.svd(W)
    W2 = (U[:, :2] * S[:2]) @ Vh[:2]
    torch.testing.assert_close(lre(h, rank=2), 2.0 * h @ W2.T + b, atol=1e-4, rtol=1e-4)
    dz = torch.randn(3, 8, generator=g)
    torch.testing.assert_close(lre.edit(dz) @ W.T, dz, atol=1e-3, rtol=1e-3)
    # a rank-k edit only moves h within W's top-k input directions
    dh = lre.edit(dz, rank=2)
    torch.testing.assert_close(dh @ Vh[:2].T @ Vh[:2], dh, atol=1e-4, rtol=1e-4)


def test_baselines_fit_their_train_pairs_and_edits_match_their_maps():
    from analoglock.relations.lre_ops import fit_baselines

    g = torch.Generator().manual_seed(1)
    H, Z = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g) * 3
    ops = fit_baselines(H, Z, lock_rank=4, lock_steps=50)
    torch.testing.assert_close(ops["identity"](H), H)
    torch.testing.assert_close(ops["translation"](H).mean(0), Z.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ops["meandiff"].b, ops["translation"].b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ops["linreg"](H), Z, atol=1e-3, rtol=1e-3)  # n <= d: interpolates
    dz = torch.randn(2, 16, generator=g)
    lock = ops["lock"]
    torch.testing.assert_close(lock.edit(dz) @ lock.W.T, dz, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ops["identity"].edit(dz), dz)


def test_the_class_mean_edit_and_the_random_control_of_the_same_norm():
    from analoglock.relations.lre_ops import class_mean_edit, same_norm_random

    pool = torch.tensor([[1.0, 0], [3.0, 0], [0, 5.0]])
    obj = torch.tensor([7, 7, 9])
    hs, ht = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 2.0]])
    # target class 7 = {pool 0, pool 1, ht}; source class 9 = {pool 2, hs}
    out = class_mean_edit(pool, obj, hs, torch.tensor([9]), ht, torch.tensor([7]))
    torch.testing.assert_close(out[0], torch.tensor([2.0, 2 / 3]) - torch.tensor([0.0, 3.0]))
    d = torch.randn(4, 6)
    r = same_norm_random(d, torch.Generator().manual_seed(0))
    torch.testing.assert_close(r.norm(dim=-1), d.norm(dim=-1))


# ---------------------------------------------------------------- one relation, end to end


def test_a_relation_runs_end_to_end_and_the_report_draws_it(tiny_model, tmp_path, monkeypatch):
    """The tiny random model knows no capital, so the filter is stubbed to say it knows them all;
    everything after it (Jacobians, operators, faithfulness, causality, tables) is real."""
    import analoglock.relations.lre as lre
    from analoglock.relations import ANALYSES, RelationsContext
    from analoglock.reports.lre import markdown, write_lre_report

    rel = load_relation("country_capital_city")
    ids = {s.subject: object_token(tiny_model.tokenizer, rel.name, s) for s in rel.samples}
    want = {}

    def knows_all(model, Z):
        return want["ids"][: len(Z)]

    real_prompts_for = lre.prompts_for

    def remember(model, relation, template, samples, examples):
        want["ids"] = torch.tensor([ids[s.subject] for s in samples])
        return real_prompts_for(model, relation, template, samples, examples)

    monkeypatch.setattr(lre, "model_answers", knows_all)
    monkeypatch.setattr(lre, "prompts_for", remember)
    ctx = RelationsContext(model=tiny_model, hooks=["blocks.1.hook_resid_post"], concepts={})
    cfg = {
        "relations": ["country_capital_city", "presidents_birth_year"],
        "layers": [1, 2],
        "n_train": 3,
        "max_samples": 12,
        "n_pairs": 3,
        "ranks": [2, 8],
        "edit_rank": 8,
        "lock_steps": 20,
        "n_boot": 50,
    }
    res = ANALYSES["lre"](cfg, ctx)
    r, skipped = res["relations"]
    assert "names nothing" in skipped["skipped"] or "only 0 samples" in skipped["skipped"]
    assert r["n_train"] == 3 and r["n_test"] == 9 and r["n_pairs"] == 3 and r["n_drawn"] == 12
    bl = r["by_layer"]["1"]
    for key in ("faithfulness", "faithfulness_objects"):
        assert set(bl[key]) == {"lre", "lre@2", "lre@8", *lre.BASELINES}
        assert all(0 <= c["lo"] <= c["mean"] <= c["hi"] <= 1 for c in bl[key].values())
    assert bl["causality"]["translation"] == bl["causality"]["identity"]
    assert set(bl["causality_random"]) == set(bl["causality"])
    s = res["summary"]
    assert (
        s["n_relations"] == 1
        and s["lre_edit"] == "lre@8"
        and "presidents_birth_year" in s["skipped"]
    )
    assert set(s["faithfulness"]["lre_minus"]) == set(lre.BASELINES)
    json.dumps(res, default=str)
    paths = write_lre_report(tmp_path, res)
    assert "country_capital_city" in paths["md"].read_text()
    assert "Faithfulness at layer 1" in paths["html"].read_text()
    assert markdown(res).count("\n|") >= 3


def test_too_few_correct_samples_is_an_error_naming_the_relation(tiny_model):
    from analoglock.relations.config import LREConfig
    from analoglock.relations.lre import evaluate_relation

    rel = load_relation("country_capital_city")  # the random tiny model knows none
    cfg = LREConfig(n_train=3, max_samples=10, strict=True, max_rounds=1)
    with pytest.raises(RelationDataError, match=r"'country_capital_city'.*n_train=3 \+ min_test=5"):
        evaluate_relation(tiny_model, rel, cfg, [1])


def test_bad_layers_and_unknown_relations_fail_before_any_work(tiny_model):
    from analoglock.relations import RelationsContext
    from analoglock.relations.lre import run

    ctx = RelationsContext(model=tiny_model, hooks=["blocks.1.hook_resid_post"], concepts={})
    with pytest.raises(ValueError, match=r"lre.layers=\[3\]: give subject layers in 0..2"):
        run({"layers": [3]}, ctx)
    with pytest.raises(FileNotFoundError, match="no shipped relation 'nope'"):
        run({"relations": ["nope"]}, ctx)


def test_the_summary_pairs_relations_and_leaves_out_one_object_relations():
    from analoglock.relations.config import LREConfig
    from analoglock.relations.lre import summarize

    def cell(x):
        return {"mean": x, "lo": x, "hi": x, "n": 4}

    def relation(name, lre, base, causal, n_objects=3):
        faith = {"lre": cell(lre), **{m: cell(base) for m in ("identity", "translation")}}
        faith.update({m: cell(base) for m in ("linreg", "meandiff", "lock")})
        caus = {"lre@4": cell(causal), "lre@16": cell(causal / 2)}
        caus.update(
            {m: cell(0.1) for m in ("identity", "translation", "linreg", "meandiff", "lock")}
        )
        at = {
            "faithfulness": faith,
            "faithfulness_objects": faith,
            "causality": caus,
            "causality_random": {m: cell(0.0) for m in caus},
        }
        return {"name": name, "kind": "factual", "n_test_objects": n_objects, "by_layer": {"3": at}}

    rels = [
        relation("a", 0.9, 0.1, 0.8),
        relation("b", 0.3, 0.0, 0.6),
        relation("c", 0.7, 0.2, 0.4),
        relation("one", 1.0, 1.0, float("nan"), n_objects=1),
        {"name": "gone", "kind": "factual", "skipped": "too few"},
    ]
    s = summarize(rels, 3, LREConfig(ranks=[4, 16], edit_rank=4, n_boot=200))
    assert (
        s["n_relations"] == 3 and s["degenerate"] == ["one"] and s["skipped"] == {"gone": "too few"}
    )
    f = s["faithfulness"]
    assert f["mean"]["lre"]["mean"] == pytest.approx(1.9 / 3, abs=1e-6)
    assert f["lre_minus"]["identity"]["mean"] == pytest.approx((0.8 + 0.3 + 0.5) / 3, abs=1e-6)
    assert f["beats_every_baseline"] and s["causality"]["beats_every_baseline"]
    assert s["causality"]["lre_best_rank"]["mean"] == pytest.approx(0.6, abs=1e-6)
    assert s["linear"] == ["a", "c"] and s["not_linear"] == ["b"]
    assert set(s["faithfulness"]["by_kind"]) == {"factual"}
