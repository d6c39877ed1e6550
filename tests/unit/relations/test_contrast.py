"""Steering vectors from contrast sets: the aggregators' math, every refusal before the model, the
protocol on the tiny random Llama (scale 0 is the unsteered model; controls at each arm's norm),
the CLI end to end, and a vector's round trip through analoglock-export-vector."""

from __future__ import annotations

import json

import pytest
import torch

from analoglock.data import DatasetFormatError
from analoglock.hooks import LayerOutOfRangeError
from analoglock.lock.steering import SteeringError
from analoglock.relations.aggregate import (
    check_aggregators,
    contrast_probe,
    first_pc,
    meandiff,
    pca_direction,
    probe_direction,
    probe_scores,
)
from analoglock.relations.contrast import (
    ContrastError,
    contrast_from_texts,
    contrast_vectors,
    harvest_contrast,
    layer_hooks,
    load_contrast,
)
from analoglock.relations.contrast_arms import MEASURES, Readout, Task, layered, run_arm
from analoglock.relations.contrast_steer import ContrastOptions, steer_contrast
from tests.helpers import FakeJudge, compose_cli

pytestmark = pytest.mark.usefixtures("one_thread")

AGGS = ("meandiff", "pca", "probe")


def _pairs(n: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)


# ---------------------------------------------------------------- the math


def test_meandiff_is_the_difference_of_class_means():
    pos, neg = _pairs(30, 16)
    assert torch.allclose(meandiff(pos, neg), pos.mean(0) - neg.mean(0), atol=1e-6)


def test_pca_is_the_top_singular_vector_of_centred_differences_signed_by_meandiff():
    gen = torch.Generator().manual_seed(1)
    d = 12
    e0, e1 = torch.eye(d)[0], torch.eye(d)[1]
    # Differences: a large mean along e0 (and a little along e1), most spread along e1.
    spread = torch.randn(60, 1, generator=gen) * 2.0
    diffs = 3.0 * e0 + 0.5 * e1 + spread * e1 + 0.05 * torch.randn(60, d, generator=gen)
    neg = torch.randn(60, d, generator=gen)
    pos = neg + diffs
    v = first_pc(pos, neg)
    _, _, vh = torch.linalg.svd((diffs - diffs.mean(0)).double(), full_matrices=False)
    assert abs(float(v.double() @ vh[0])) == pytest.approx(1.0, abs=1e-5)  # the top PC, up to sign
    assert float(v @ meandiff(pos, neg)) > 0  # ... signed along the mean difference
    assert abs(float(v @ e1)) > 0.99  # centring matters: uncentred, the top vector would be ~e0
    _, _, raw = torch.linalg.svd(diffs.double(), full_matrices=False)
    assert abs(float(raw[0] @ e0.double())) > 0.8
    flipped = first_pc(neg, pos)  # swapping the classes flips the sign, never the axis
    assert torch.allclose(flipped, -v, atol=1e-5)
    assert pca_direction(pos, neg).norm() == pytest.approx(
        float(meandiff(pos, neg).norm()), rel=1e-5
    )


def test_probe_separates_a_synthetic_separable_set():
    gen = torch.Generator().manual_seed(2)
    d, n = 20, 40
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    base = torch.randn(2 * n, d, generator=gen)
    base = base - (base @ u)[:, None] * u  # noise everywhere but along u ...
    side = 1.0 + torch.rand(2 * n, 1, generator=gen)  # ... where the classes sit >= 1 from 0
    pos, neg = base[:n] + side[:n] * u, base[n:] - side[n:] * u  # separable by a margin of 2
    tr, te = slice(0, 30), slice(30, n)
    probe = contrast_probe(pos[tr], neg[tr])
    assert (probe_scores(probe, pos[te]) > 0.5).all() and (probe_scores(probe, neg[te]) < 0.5).all()
    v = probe_direction(pos[tr], neg[tr])
    assert float(torch.nn.functional.cosine_similarity(v, u, dim=0)) > 0.8
    assert v.norm() == pytest.approx(float(meandiff(pos[tr], neg[tr]).norm()), rel=1e-5)
    x = torch.cat([pos[te], neg[te]])
    proj = x @ v
    assert (proj[: n - 30] > proj[n - 30 :].max()).all()  # its projection alone separates


def test_aggregator_names_are_checked():
    assert check_aggregators(["probe", "meandiff", "probe"]) == ("probe", "meandiff")
    with pytest.raises(ValueError, match="Did you mean 'meandiff'"):
        check_aggregators(["meandif"])
    with pytest.raises(ValueError, match="ckpt="):
        check_aggregators(["lock"])


# ---------------------------------------------------------------- sources and refusals


def test_concept_set_specs():
    c = load_contrast("emotion:angry-calm")
    assert (c.positive, c.negative, c.kind) == ("angry", "calm", "concepts")
    assert c.counts() == {"train": 36, "validation": 6, "test": 6}
    assert c.prompt_texts == c.neg_texts and "calm" not in c.pos_texts[0].split()
    assert load_contrast("emotion").positive == "angry"  # two classes: file order
    rev = load_contrast("emotion:calm-angry")
    assert rev.pos_texts == c.neg_texts
    with pytest.raises(ContrastError, match="no class 'happy'.*angry, calm"):
        load_contrast("emotion:angry-happy")
    with pytest.raises(ContrastError, match="pick two"):
        load_contrast("animals")
    with pytest.raises(ContrastError, match="against itself"):
        load_contrast("emotion:calm-calm")
    with pytest.raises(ContrastError, match="no such concept set.*emotion.*fable_work"):
        load_contrast("emotions:angry-calm")


def test_a_concept_set_with_one_class_is_refused(tmp_path):
    path = tmp_path / "mood.jsonl"
    rows = [
        {"id": f"m/{i:03d}", "split": "train", "template": "I feel {x}.", "fills": {"sad": "sad"}}
        for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ContrastError, match="one class \\(sad\\)"):
        load_contrast(str(path))


def test_pair_dataset_direction_and_prompts():
    c = load_contrast("fable_work")
    assert (c.positive, c.negative, c.kind) == ("work", "fable", "pairs")
    assert all(p.startswith("Once upon a time") for p in c.prompt_texts)
    assert len(c.prompt_texts[0]) < len(c.neg_texts[0])  # an opening, not the whole story
    rev = load_contrast("fable_work:fable-work")
    assert rev.pos_texts == c.neg_texts
    with pytest.raises(ContrastError, match="sides 'fable' \\(a\\) and 'work' \\(b\\)"):
        load_contrast("fable_work:office-fable")


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_a_user_file_reads_and_every_bad_line_is_named(tmp_path):
    good = [{"positive": f"I am furious about {i}.", "negative": f"I am calm about {i}."} for i in range(20)]  # fmt: skip
    c = load_contrast(str(_write(tmp_path / "mine.jsonl", good)))
    assert c.kind == "file" and c.counts() == {"train": 14, "validation": 3, "test": 3}
    assert c.prompt_texts[0] == "I am calm about 0."
    cases = [
        ({"positive": "x", "negative": ""}, "negative.*empty"),
        ({"positive": "x"}, "missing 'negative'"),
        ({"positive": "x", "negative": "y", "postive": "z"}, "unknown field.*'postive'.*valid fields"),
        ({"positive": "x", "negative": "y", "split": "dev"}, "split 'dev'"),
        ('{"positive": "x", ', "not valid JSON"),
    ]  # fmt: skip
    for row, message in cases:
        path = _write(tmp_path / "bad.jsonl", [*good[:2], row, *good[3:]])
        with pytest.raises(DatasetFormatError, match=f"bad.jsonl:3: .*{message}"):
            load_contrast(str(path))
    with pytest.raises(DatasetFormatError, match='"positive": "<text'):  # says what is valid
        load_contrast(str(_write(tmp_path / "bad.jsonl", [{"positive": "x", "negative": " "}])))
    with pytest.raises(ContrastError, match="10 train, 0 validation and 0 test"):
        load_contrast(str(_write(tmp_path / "few.jsonl", good[:10])))
    with pytest.raises(ContrastError, match="no such file"):
        load_contrast(str(tmp_path / "missing.jsonl"))


def test_unbalanced_texts_say_their_counts():
    with pytest.raises(ContrastError, match="unbalanced classes, 20 positive vs 19 negative"):
        contrast_from_texts(["a"] * 20, ["b"] * 19)
    assert contrast_from_texts(["a"] * 20, ["b"] * 20).counts()["test"] == 3


def test_layers_are_checked_and_say_the_valid_range():
    assert layer_hooks([1, 3], n_layers=4) == [
        "blocks.1.hook_resid_post",
        "blocks.3.hook_resid_post",
    ]
    with pytest.raises(LayerOutOfRangeError, match="valid layers 0..3"):
        layer_hooks([2, 9], n_layers=4)
    with pytest.raises(ContrastError, match="negative"):
        layer_hooks([-1])
    with pytest.raises(ContrastError, match="twice"):
        layer_hooks([2, 2])
    with pytest.raises(SteeringError, match="no aligned roles"):
        ContrastOptions(positions=("roles",)).check()


def test_a_layer_outside_the_model_fails_before_the_harvest(tiny_model):
    with pytest.raises(LayerOutOfRangeError, match="4 layers \\(valid layers 0..3\\)"):
        steer_contrast(
            tiny_model, load_contrast("emotion:angry-calm"), ContrastOptions(layers=(7,))
        )


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ([], ValueError, "exactly one of ckpt=.*got neither"),
        (["ckpt=/x", "contrast=emotion:angry-calm"], ValueError, "got both"),
        (["contrast=emotion:angry-calm", "aggregator=[meandiff,pcaa]"], ValueError, "'pcaa'"),
        (["contrast=emotion:angry-happy"], ContrastError, "no class 'happy'"),
        (["contrast=emotion:angry-calm", "read=first"], ContrastError, "read='first'"),
    ],
)
def test_cli_refuses_bad_input_before_loading_the_model(overrides, error, message):
    from analoglock.cli.steer import run

    cfg = compose_cli("steer", ["model=hf", "model.spec=/nonexistent", *overrides])
    with pytest.raises(error, match=message):
        run(cfg)


# ---------------------------------------------------------------- the protocol on the tiny model


def test_scale_zero_reproduces_the_unsteered_model(tiny_model):
    c = load_contrast("emotion:angry-calm")
    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    acts = harvest_contrast(tiny_model, c, hooks, "mean")
    vecs = contrast_vectors(acts, AGGS, hooks)
    p, n = acts.class_acts(hooks[1], "angry", "train"), acts.class_acts(hooks[1], "calm", "train")
    assert torch.allclose(vecs.vectors["meandiff"][hooks[1]], p.mean(0) - n.mean(0), atol=1e-5)
    assert acts.split_mask("train").sum() == 36  # vectors saw train rows only
    readout = Readout(contrast_probe(p, n), hooks[1], "mean")
    task = Task("validation", ["a", "b"], list(c.prompt_texts[36:38]), ["The sky is blue."])
    kw = dict(max_new_tokens=3, batch_size=4)
    base = run_arm(tiny_model, task, None, readout, "unsteered", **kw)
    zero = run_arm(tiny_model, task, layered(tiny_model, vecs.vectors["probe"], 0.0), readout, "z", **kw)  # fmt: skip
    assert zero.texts == base.texts and torch.equal(zero.score, base.score)
    assert float(zero.neutral_kl.abs().max()) == 0.0
    big = run_arm(tiny_model, task, layered(tiny_model, vecs.vectors["probe"], 50.0), readout, "b", **kw)  # fmt: skip
    assert float(big.neutral_kl.min()) > 0  # a push at both layers does move the model


def test_a_pair_file_is_judged_toward_its_positive_side(tiny_model, tmp_path):
    from analoglock.data.loaders import DATA_DIR

    lines = (DATA_DIR / "pairs" / "fable_work.jsonl").read_text().splitlines()[:20]
    path = tmp_path / "fable_work.jsonl"
    path.write_text("\n".join(lines) + "\n")
    opts = ContrastOptions(
        layers=(2,), scales=(2.0,), n_random=2, max_new_tokens=3, n_prompts=2, n_boot=50,
        progress=False,
    )  # fmt: skip
    report, _ = steer_contrast(tiny_model, load_contrast(str(path)), opts, judge=FakeJudge())
    assert report["source"]["direction"] == "work - fable" and report["judge"]
    assert "judge_shift" in report["measures"]
    assert report["test"]["summary"]["arms"]["unsteered"]["judge_shift"]["value"] == 0.0
    assert "judge_shift" in report["test"]["summary"]["paired"]["probe_vs_meandiff"]
    assert report["generations"][0]["prompt"].startswith("Once upon a time")


# ---------------------------------------------------------------- the CLI and the vector files


@pytest.fixture(scope="module")
def cli_run(tiny_dir, tmp_path_factory):
    from analoglock.cli.steer import run

    out = tmp_path_factory.mktemp("steer") / "emotion"
    cfg = compose_cli(
        "steer",
        [
            "model=hf", f"model.spec={tiny_dir}", "contrast=emotion:angry-calm",
            "aggregator=[meandiff,pca,probe]", "layers=[1,2]", "scale=[1,3]", "n_random=3",
            "max_new_tokens=3", "n_prompts=3", "n_boot=100", "progress=false", f"out_dir={out}",
        ],
    )  # fmt: skip
    return run(cfg), out


def test_cli_writes_steer_json_with_every_aggregator_and_the_random_p_values(cli_run):
    report, out = cli_run
    saved = json.loads((out / "steer.json").read_text())
    assert saved["test"]["summary"] == report["test"]["summary"]
    assert saved["config"]["contrast"] == "emotion:angry-calm"
    assert saved["hooks"] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert (
        saved["probe"]["hook"] == "blocks.2.hook_resid_post" and saved["probe"]["n_heldout"] == 12
    )
    arms = saved["test"]["summary"]["arms"]
    assert set(arms) == {"unsteered", *AGGS}
    assert set(arms["probe"]) == set(MEASURES) - {"judge_shift"}
    assert arms["unsteered"]["concept_shift"]["value"] == 0.0
    assert arms["unsteered"]["fluency_ratio"]["value"] == 1.0
    assert len(saved["sweep"]) == 6  # 3 aggregators x 2 scales, on validation
    assert saved["selection"]["split"] == "validation" and saved["test"]["split"] == "test"
    for agg in AGGS:
        chosen = saved["selection"]["chosen"][agg]
        assert chosen["scale"] in (1.0, 3.0)
        spec = saved["test"]["arms"][agg]
        assert spec["scale"] == chosen["scale"] and spec["hooks"] == saved["hooks"]
        rnd = saved["test"]["random"][agg]
        assert rnd["n"] == 3 and set(rnd["p_values"]) == set(saved["measures"])
        assert all(0.25 <= p <= 1.0 for p in rnd["p_values"].values())  # floor 1 / (3 + 1)
        assert rnd["norm"] == pytest.approx(spec["norm"], rel=1e-5)
        randoms = [v for k, v in saved["per_prompt"].items() if k.startswith("random_")]
        assert any(r["spec"]["norm"] == pytest.approx(spec["norm"], rel=1e-4) for r in randoms)
    norms = saved["vectors"]["norms"]["blocks.2.hook_resid_post"]
    assert norms["pca"] == pytest.approx(norms["meandiff"], rel=1e-5)
    assert norms["probe"] == pytest.approx(norms["meandiff"], rel=1e-5)
    assert len(saved["generations"]) == 3 and set(AGGS) <= set(saved["generations"][0])
    page = (out / "steer.html").read_text()
    assert page.count("Plotly.newPlot") == 3 and "logistic probe" in page
    assert set(saved["vector_files"]) == set(AGGS)


def test_cli_prints_the_generations_and_numbers(cli_run, capsys):
    from analoglock.cli.steer import print_contrast_report

    print_contrast_report(cli_run[0], n_show=1)
    out = capsys.readouterr().out
    for word in ("angry - calm", "unsteered", "probe", "concept_shift", "p vs 3 random", "seconds"):
        assert word in out


def test_exported_vector_round_trips_with_its_provenance(cli_run, tiny_model):
    from analoglock.cli.export_vector import run as export
    from analoglock.model import model_info
    from analoglock.vectors import load_gguf, load_safetensors

    report, out = cli_run
    result = export(compose_cli("export_vector", [f"src={out}", "vector=probe"]))
    assert result["written"] == [str(out / "controlvector-probe.gguf")]
    cv = load_gguf(out / "controlvector-probe.gguf")
    stored = load_safetensors(out / "vector-probe.safetensors")
    assert set(cv.directions) == {1, 2}
    for n in (1, 2):
        assert torch.equal(cv.directions[n], stored.directions[n])
    # The file holds the probe vector at the scale chosen on validation.
    hooks = report["hooks"]
    acts = harvest_contrast(tiny_model, load_contrast("emotion:angry-calm"), hooks, report["read"])
    vecs = contrast_vectors(acts, ["probe"], hooks)
    best = report["selection"]["chosen"]["probe"]["scale"]
    for n, h in ((1, hooks[0]), (2, hooks[1])):
        assert torch.allclose(cv.directions[n], best * vecs.vectors["probe"][h], atol=1e-5)
    p = cv.provenance
    assert p["aggregator"] == "probe" and p["source"] == "contrast:probe"
    assert p["data"] == "emotion:angry-calm" and p["direction"] == "angry - calm"
    assert p["best_scale"] == p["scale"] == best
    assert p["model"]["sha256"] == model_info(tiny_model).sha256
    assert p["hooks"] == {"1": hooks[0], "2": hooks[1]}
    measured = report["test"]["summary"]["arms"]["probe"]["concept_shift"]["value"]
    assert p["effect"]["concept_shift"] == pytest.approx(measured)
    assert set(p["effect"]["p_random"]) == set(report["measures"])
    with pytest.raises(Exception, match="vector-meandiff.safetensors, vector-pca"):
        export(compose_cli("export_vector", [f"src={out}", "vector=lerned"]))
