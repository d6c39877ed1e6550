"""Steering on the tiny random Llama: exact no-ops at scale 0, exact adds, controls, measures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from analoglock.generation import encode_prompts, generate
from analoglock.lock.steering import (
    add_vector_hook,
    apply_map_hook,
    continuation_perplexity,
    distinct_n,
    domain_mass,
    domain_vocab,
    evaluate_steering,
    neutral_kl,
    plot_steering,
    random_control,
    steer,
)

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["Once upon a time, a tortoise and a hare", "A fox saw some grapes"]
NEUTRAL = ["The train leaves at nine.", "Water boils at one hundred degrees."]
FOREST = ["The fox chased a rabbit through the forest.", "A rabbit hid from the fox in the forest."]
OFFICE = [
    "The office manager moved the deadline.",
    "The manager met the office team before the deadline.",
]


class FakeJudge:
    """Deterministic stand-in with the judge's interface: score = text length."""

    def domain_score(self, texts, a_refs, b_refs):
        return torch.tensor([float(len(t)) for t in texts])


@pytest.fixture(scope="module")
def vector():
    return torch.randn(64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ids(tiny_model):
    return encode_prompts(tiny_model, PROMPTS)


def test_scale_zero_reproduces_logits_and_generation_exactly(tiny_model, ids, vector):
    tokens, mask = ids
    clean = tiny_model(tokens, attention_mask=mask)
    with steer(tiny_model, HOOK, add_vector_hook(vector, 0.0)):
        steered = tiny_model(tokens, attention_mask=mask)
    assert torch.equal(clean, steered)
    base = generate(tiny_model, PROMPTS, max_new_tokens=6)
    zero = generate(
        tiny_model, PROMPTS, max_new_tokens=6, fwd_hooks=[(HOOK, add_vector_hook(vector, 0.0))]
    )
    assert zero == base
    big = generate(
        tiny_model, PROMPTS, max_new_tokens=6, fwd_hooks=[(HOOK, add_vector_hook(vector, 50.0))]
    )
    assert big.new_tokens != base.new_tokens  # the hook does reach generation


def test_added_vector_changes_the_residual_by_exactly_scale_times_vector(tiny_model, ids, vector):
    tokens, _ = ids
    _, clean = tiny_model.run_with_cache(tokens[:1], names_filter=[HOOK])
    seen = {}

    def capture(x, hook):
        seen["x"] = x.clone()

    with tiny_model.hooks(fwd_hooks=[(HOOK, add_vector_hook(vector, 3.0)), (HOOK, capture)]):
        tiny_model(tokens[:1])
    assert torch.equal(seen["x"], clean[HOOK] + 3.0 * vector)


def test_new_positions_only_touch_the_last_prompt_token_and_decode_steps(vector):
    fn = add_vector_hook(vector, 2.0, positions="new")
    x = torch.randn(2, 5, 64)
    out = fn(x)
    assert torch.equal(out[:, :-1], x[:, :-1])
    assert torch.equal(out[:, -1], x[:, -1] + 2.0 * vector)
    step = torch.randn(2, 1, 64)
    assert torch.equal(fn(step), step + 2.0 * vector)
    with pytest.raises(ValueError, match="positions"):
        add_vector_hook(vector, 1.0, positions="prompt")


def test_steer_removes_its_hook_even_on_error(tiny_model, ids, vector):
    tokens, mask = ids
    clean = tiny_model(tokens, attention_mask=mask)
    with pytest.raises(RuntimeError), steer(tiny_model, HOOK, add_vector_hook(vector, 10.0)):
        raise RuntimeError
    assert torch.equal(tiny_model(tokens, attention_mask=mask), clean)


def test_random_control_same_norm_different_direction_seeded(vector):
    c = random_control(vector, seed=0)
    assert c.shape == vector.shape and c.dtype == vector.dtype
    torch.testing.assert_close(c.norm(), vector.norm())
    assert not torch.allclose(c, vector)
    assert torch.equal(c, random_control(vector, seed=0))
    assert not torch.equal(c, random_control(vector, seed=1))


def test_apply_map_hook_alpha_zero_is_a_no_op(tiny_model, ids):
    from analoglock.lock.maps import AffineMap

    mapper = AffineMap(d_model=64)
    with torch.no_grad():
        for p in mapper.parameters():
            p.normal_(0, 1.0)
    x = torch.randn(2, 5, 64)
    assert torch.equal(apply_map_hook(mapper, 0.0)(x), x)
    torch.testing.assert_close(apply_map_hook(mapper, 1.0)(x), mapper(x))
    tokens, mask = ids
    clean = tiny_model(tokens, attention_mask=mask)
    with steer(tiny_model, HOOK, apply_map_hook(mapper, 0.0)):
        assert torch.equal(tiny_model(tokens, attention_mask=mask), clean)


def test_neutral_kl_zero_without_hooks_positive_with_a_large_vector(tiny_model, vector):
    assert neutral_kl(tiny_model, NEUTRAL, []) == 0.0
    assert neutral_kl(tiny_model, NEUTRAL, [(HOOK, add_vector_hook(vector, 0.0))]) == 0.0
    assert neutral_kl(tiny_model, NEUTRAL, [(HOOK, add_vector_hook(vector, 20.0))]) > 1e-3


def test_continuation_perplexity_matches_hand_computation(tiny_model):
    conts = [[500, 600, 700, 800], [900, 1000]]  # different lengths: padding must not matter
    ppl = continuation_perplexity(tiny_model, conts)
    bos = tiny_model.tokenizer.bos_token_id
    for k, cont in enumerate(conts):
        logits = tiny_model(torch.tensor([[bos, *cont]]))[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        expected = torch.exp(-logp[torch.arange(len(cont)), torch.tensor(cont)].mean())
        torch.testing.assert_close(ppl[k], expected, rtol=1e-5, atol=1e-5)
    assert math.isnan(float(continuation_perplexity(tiny_model, [[]])[0]))


def test_domain_mass_matches_hand_computation(tiny_model):
    vocab_a, vocab_b = torch.tensor([500, 501]), torch.tensor([700])
    cont = [900, 901, 902]
    got = domain_mass(tiny_model, PROMPTS[:1], [cont], vocab_a, vocab_b)
    prompt = encode_prompts(tiny_model, PROMPTS[:1])[0][0].tolist()
    p = torch.softmax(tiny_model(torch.tensor([prompt + cont]))[0].float(), -1)[len(prompt) - 1 :]
    expected = (p[:, vocab_b].sum(-1) - p[:, vocab_a].sum(-1)).mean()
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-7)


def test_distinct_n_catches_loops():
    got = distinct_n([[1, 2, 3, 4], [5, 6, 5, 6, 5, 6], [7]])
    assert got[0] == 1.0 and got[1] == pytest.approx(2 / 5) and math.isnan(float(got[2]))


def test_domain_vocab_picks_domain_words(tiny_model):
    a_texts = ["forest fox rabbit, the forest and the fox and the rabbit"] * 3
    b_texts = ["office manager deadline, the office and the manager and the deadline"] * 3
    a_ids, b_ids = domain_vocab(tiny_model, a_texts, b_texts)
    dec = tiny_model.tokenizer.decode
    a_words = {dec([int(i)]).strip() for i in a_ids}
    b_words = {dec([int(i)]).strip() for i in b_ids}
    assert {"forest", "fox", "rabbit"} <= a_words
    assert {"office", "manager", "deadline"} <= b_words
    assert not a_words & b_words
    assert "the" not in a_words | b_words and "and" not in a_words | b_words  # shared, not topical
    assert all(len(w) >= 3 for w in a_words | b_words)


def test_evaluate_steering_keys_and_exact_zero_at_scale_zero(tiny_model, vector, tmp_path):
    report = evaluate_steering(
        tiny_model,
        vector,
        HOOK,
        PROMPTS,
        FOREST,
        OFFICE,
        [0, 1],
        NEUTRAL,
        {"meandiff": torch.randn(64, generator=torch.Generator().manual_seed(2))},
        max_new_tokens=5,
        judge=FakeJudge(),
        progress=False,
    )
    keys = {
        "scale", "domain_shift", "control_domain_shift", "judge_shift", "control_judge_shift",
        "meandiff_judge_shift", "meandiff_domain_shift", "neutral_kl", "control_neutral_kl",
        "fluency_ratio", "control_fluency_ratio", "meandiff_fluency_ratio",
        "diversity_ratio", "control_diversity_ratio", "meandiff_diversity_ratio",
    }  # fmt: skip
    assert [r["scale"] for r in report["results"]] == [0.0, 1.0]
    for row in report["results"]:
        assert keys <= set(row)
    zero = report["results"][0]
    for key, value in zero.items():
        if key.endswith("_shift") or key.endswith("neutral_kl"):
            assert value == 0.0, key
        if key.endswith("_ratio"):
            assert value == 1.0, key
    assert len(report["generations"]) == len(PROMPTS)
    for item in report["generations"]:
        assert {"prompt", "before", "after", "control", "meandiff"} <= set(item)
    json.dumps(report)  # everything is plain JSON
    fig = plot_steering(report, tmp_path / "steer.html")
    html = (tmp_path / "steer.html").read_text()
    assert "<html>" in html and len(html) > 1_000_000  # standalone: plotly.js is inlined
    assert len(fig.data) == 6  # learned, control, meandiff on each of two panels


# ---------------------------------------------------------------- judge


@pytest.fixture(scope="module")
def judge():
    from analoglock.lock.judge import JudgeNotFoundError, judge_model_dir, load_judge

    try:
        judge_model_dir()
    except JudgeNotFoundError as err:
        pytest.skip(str(err))
    return load_judge()


def test_judge_scores_office_as_b_and_forest_as_a(judge):
    animals = [
        "The fox hunted rabbits in the forest.",
        "A wolf howled at the moon beside the old oak tree.",
        "The bear slept in its cave all winter long.",
    ]
    offices = [
        "The manager asked the team to finish the report by Friday.",
        "Employees gathered in the conference room for the budget meeting.",
        "The office printer jammed again just before the deadline.",
    ]
    emb = judge.embed(["hello", "two words"])
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    office = judge.domain_score(
        ["The manager scheduled a meeting about the quarterly report"], animals, offices
    )
    forest = judge.domain_score(["The fox ran through the forest"], animals, offices)
    assert office.item() > 0 > forest.item()


def test_missing_judge_package_says_how_to_install(monkeypatch):
    import importlib.util

    from analoglock.lock import judge as judge_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == judge_mod.JUDGE_PACKAGE else real(name, *a),
    )
    with pytest.raises(judge_mod.JudgeNotFoundError, match="make install"):
        judge_mod.judge_model_dir()


# ---------------------------------------------------------------- CLI


def test_cli_pieces(tmp_path):
    from analoglock.cli.steer import parse_scales, pick_texts, read_prompts, story_opening
    from analoglock.data.loaders import load_pairs

    assert (
        story_opening("A fox lost his tail. He was ashamed.")
        == "Once upon a time, a fox lost his tail."
    )
    assert story_opening("Zeus was angry. Very.") == "Once upon a time, Zeus was angry."
    assert read_prompts(None) is None
    assert read_prompts(["a", " ", "b"]) == ["a", "b"]
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(str(path)) == ["first prompt", "second prompt"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_prompts(str(tmp_path / "missing.txt"))
    assert parse_scales(4) == [4.0] and parse_scales([0, 2]) == [0.0, 2.0]
    with pytest.raises(ValueError, match="scale"):
        parse_scales("big")
    pairs = load_pairs("fable_work", "test")
    prompts, a_refs, b_refs = pick_texts(pairs, None, 3)
    assert len(prompts) == 3 and len(a_refs) == len(b_refs) == len(pairs) - 3
    assert not {p.a for p in pairs[:3]} & set(a_refs)  # prompts' own stories are not references
    with pytest.raises(ValueError, match="n_prompts"):
        pick_texts(pairs, None, len(pairs))


class _Translation:
    """The least a mapper needs for save_relation."""

    kind = "translation"

    def __init__(self, r):
        self.r = r

    def config(self):
        return {"d_model": 64}

    def export_tensors(self):
        return {"r": self.r}


def test_cli_end_to_end(tiny_model, tiny_dir, tmp_path, monkeypatch, vector):
    from hydra import compose, initialize_config_dir

    from analoglock.lock import steering
    from analoglock.cli._conf import CONF_DIR
    from analoglock.cli.steer import print_report, run
    from analoglock.lock.export import save_relation
    from analoglock.model import model_info

    ckpt = tmp_path / "run"
    center = torch.full((64,), 100.0)  # a mean activation: must never be steered with
    vectors = {"relation": vector, "meandiff": 0.5 * vector.flip(0), "center": center}
    # A clone: save_relation refuses two names sharing one storage (a safetensors rule).
    save_relation(
        ckpt,
        _Translation(vector.clone()),
        vectors,
        model=model_info(tiny_model).to_dict(),
        hook=HOOK,
    )
    monkeypatch.setattr(steering, "load_judge", lambda: FakeJudge())
    overrides = [
        "model=hf",
        f"model.spec={tiny_dir}",
        f"ckpt={ckpt}",
        "n_prompts=2",
        "scale=[0,2]",
        "max_new_tokens=3",
        "n_controls=1",
        "progress=false",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="steer", overrides=overrides)
    report = run(cfg)
    saved = json.loads((ckpt / "steer.json").read_text())
    assert saved["results"] == report["results"]
    assert saved["results"][0]["judge_shift"] == 0.0 and saved["results"][0]["fluency_ratio"] == 1.0
    assert saved["norms"]["meandiff"] == pytest.approx(0.5 * float(vector.norm()), rel=1e-5)
    assert saved["generations"][0]["prompt"].startswith("Once upon a time, ")
    assert "center" not in saved["norms"] and "center" not in saved["results"][0]
    assert (ckpt / "steer.html").exists()
    print_report(report)  # the rich tables render


def test_steering_hooks_for_layers():
    from analoglock.cli.steer import steering_hooks

    assert steering_hooks("blocks.12.hook_resid_post", None) == ["blocks.12.hook_resid_post"]
    assert steering_hooks("blocks.12.hook_resid_post", [3, 5]) == [
        "blocks.3.hook_resid_post",
        "blocks.5.hook_resid_post",
    ]
    assert steering_hooks("blocks.12.hook_mlp_out", 7) == ["blocks.7.hook_mlp_out"]
