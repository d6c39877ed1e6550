"""The steering protocol on the tiny random Llama: arms at matched norm, selection on validation
only, strict JSON, statistics against hand computations, steer.html, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from analoglock.lock.export import load_artifact, save_artifact
from analoglock.lock.maps import build_mapper
from analoglock.lock.steering import (
    MEASURES,
    ArmResult,
    SteeringError,
    SteerOptions,
    arm_measures,
    arm_results,
    headline,
    random_p_values,
    run_steering,
    select,
    summarize,
)
from analoglock.lock.steering.arms import fluency_matched
from analoglock.lock.steering.prompts import ASK, StoryPrompt, asked_prompts, resolve_ask
from analoglock.model import model_info
from tests.helpers import FakeJudge

HOOK = "blocks.1.hook_resid_post"

pytestmark = pytest.mark.usefixtures("one_thread")


def make_artifact(model, out_dir, control=True, seed=0, **extra):
    """A random affine lock (and control) at HOOK with every vector steering reads. `seed` draws
    the maps (as a training seed would); the data's vectors (meandiff, cov_a) stay the same."""
    gen = torch.Generator().manual_seed(seed)
    mapper = build_mapper("affine", d_model=64)
    ctl = build_mapper("affine", d_model=64)
    with torch.no_grad():
        for p in [*mapper.parameters(), *ctl.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 64, generator=gen)
    with torch.no_grad():
        learned = (mapper(a) - a).mean(0)
    vectors = {
        "learned": learned,
        "meandiff": torch.randn(64, generator=gen) * 0.5,
        "center": a.mean(0),
        "cov_a": torch.cov(a.T),
    }
    save_artifact(
        out_dir,
        mapper,
        vectors,
        model=model_info(model).to_dict(),
        hook=HOOK,
        control_mapper=ctl if control else None,
        extra={"dataset": "fable_work", **extra},
    )
    return out_dir


SMALL = dict(
    alphas=(0.5, 1.0),
    positions=("roles", "new"),
    scales=(1.0, 3.0),
    n_random=3,
    max_new_tokens=4,
    n_prompts=4,
    n_boot=200,
    progress=False,
)


@pytest.fixture(scope="module")
def artifact(tiny_model, tmp_path_factory):
    return load_artifact(make_artifact(tiny_model, tmp_path_factory.mktemp("lock")), tiny_model)


@pytest.fixture(scope="module")
def report(tiny_model, artifact):
    return run_steering(tiny_model, artifact, SteerOptions(**SMALL), judge=FakeJudge())


# ---------------------------------------------------------------- the protocol


def test_report_is_strict_json_with_every_arm_and_measure(report):
    text = json.dumps(report, allow_nan=False)  # NaN would raise: they are null
    assert json.loads(text) == report
    arms = report["test"]["summary"]["arms"]
    assert set(arms) == {
        "unsteered", "lock", "control_map", "meandiff", "meandiff_best", "meandiff_norm", "asked"
    }  # fmt: skip
    for cells in arms.values():
        assert set(cells) == set(MEASURES)
    base = arms["unsteered"]
    assert base["judge_shift"]["value"] == 0.0 and base["neutral_kl"]["value"] == 0.0
    assert base["fluency_ratio"]["value"] == 1.0 and base["diversity_ratio"]["value"] == 1.0
    test = report["test"]
    assert test["n_prompts"] == 4 and test["n_candidates"] == 4 and test["n_neutral"] == 10
    assert test["chance"]["analogue_top1"] == 0.25
    assert set(test["random"]["p_values"]) == set(MEASURES)
    assert len(test["random"]["values"]["role_mrr"]) == 3
    paired = report["test"]["summary"]["paired"]
    assert set(paired) == {f"{a}_vs_meandiff" for a in arms if a != "meandiff"}


def test_asked_arm_is_the_unsteered_model_given_the_datasets_instruction(report):
    """The reference arm: each test opening inside fable_work's shipped instruction, in the chat
    template, no steering; its role transfer is not measured (NaN -> null), everything else is."""
    spec = report["test"]["arms"]["asked"]
    assert spec == {"reference": "asked", "instruction": ASK["fable_work"]}
    asked = report["per_prompt"]["asked"]
    assert all(r is None for r in asked["role_rank"])
    assert len(asked["texts"]) == 4 and all(a is not None for a in asked["analogue_rank"])
    cells = report["test"]["summary"]["arms"]["asked"]
    assert cells["role_mrr"]["value"] is None and cells["role_top1"]["value"] is None
    assert cells["analogue_mrr"]["value"] is not None
    assert cells["neutral_kl"]["value"] == 0.0  # nothing is steered
    gens = report["generations"]
    assert all("asked" in g for g in gens)
    # Instruction-following changes what is written: not the unsteered continuation.
    assert [g["asked"] for g in gens] != [g["unsteered"] for g in gens]


def test_asked_prompts_wrap_each_opening_in_the_instruction(tiny_model):
    prompts = [StoryPrompt("p0", "Once upon a time, a fox saw grapes.", ("fox",), "An analyst.", 0)]
    (p,) = asked_prompts(tiny_model, prompts, "Retell: {prompt}")
    assert "Retell: Once upon a time, a fox saw grapes." in p.text
    assert p.text != "Retell: Once upon a time, a fox saw grapes."  # inside the chat template
    assert (p.id, p.roles, p.analogue, p.index) == ("p0", ("fox",), "An analyst.", 0)


def test_resolve_ask(tiny_model):
    assert resolve_ask("auto", "fable_work", tiny_model) == ASK["fable_work"]
    assert resolve_ask("auto", "my_pairs.jsonl", tiny_model) is None  # no shipped instruction
    assert resolve_ask(None, "fable_work", tiny_model) is None
    assert resolve_ask("Say it at work: {prompt}", None, tiny_model) == "Say it at work: {prompt}"

    class Base:  # a base model: no chat template, so it is not asked
        tokenizer = type("T", (), {"chat_template": None})()

    assert resolve_ask("auto", "fable_work", Base()) is None
    with pytest.raises(SteeringError, match=r"\{prompt\}"):
        SteerOptions(ask="Retell it at work.").check()


def test_selection_uses_validation_and_its_constraints(report):
    sel = report["selection"]
    assert sel["split"] == "validation" and report["test"]["split"] == "test"
    lock_rows = [r for r in report["sweep"] if r["arm"] == "lock"]
    md_rows = [r for r in report["sweep"] if r["arm"] == "meandiff"]
    assert len(lock_rows) == 4 and len(md_rows) == 2  # 2 alphas x 2 positions; 2 scales x all
    assert (sel["lock"]["alpha"], sel["lock"]["positions"]) in {
        (r["alpha"], r["positions"]) for r in lock_rows
    }
    feasible = [r for r in lock_rows if r["fluency_ratio"] <= 1.5 and r["diversity_ratio"] >= 0.8]
    if feasible:
        assert sel["lock"]["constraint_met"]
        assert sel["lock"]["analogue_mrr"] == max(r["analogue_mrr"] for r in feasible)
    spec = report["test"]["arms"]["lock"]
    assert spec["alpha"] == sel["lock"]["alpha"] and spec["positions"] == sel["lock"]["positions"]
    assert report["test"]["arms"]["control_map"]["alpha"] == spec["alpha"]
    assert report["test"]["arms"]["control_map"]["positions"] == spec["positions"]
    assert report["test"]["arms"]["meandiff"]["scale"] == sel["meandiff"]["scale"]


def test_controls_have_the_lock_norm(report, artifact):
    alpha = report["selection"]["lock"]["alpha"]
    norm = alpha * float(artifact.vectors["learned"].norm())
    assert report["test"]["random"]["norm"] == pytest.approx(norm)
    assert report["test"]["random"]["kind"] == "covariance"
    assert report["test"]["arms"]["meandiff_norm"]["norm"] == pytest.approx(norm, rel=1e-5)
    assert (
        report["test"]["arms"]["meandiff_norm"]["positions"]
        == report["test"]["arms"]["lock"]["positions"]
    )
    for name, obj in report["per_prompt"].items():
        if name.startswith("random_"):
            assert obj["spec"]["norm"] == pytest.approx(norm, rel=1e-5)
            assert obj["spec"]["positions"] == report["test"]["arms"]["lock"]["positions"]


def test_generations_side_by_side(report):
    from analoglock.data import load_pairs

    pairs = load_pairs("fable_work", "test")[:4]
    for g, pair in zip(report["generations"], pairs, strict=True):
        assert g["id"] == pair.id and g["analogue"] == pair.b
        assert {"prompt", "unsteered", "lock", "meandiff", "control_map", "random"} <= set(g)
        assert g["prompt"].startswith("Once upon a time, ")


def test_per_prompt_values_round_trip_and_summarize_over_seeds(report):
    runs = arm_results(report)
    assert "unsteered" in runs and not any(k.startswith("random_") for k in runs)
    assert len(arm_results(report, randoms=True)) == len(runs) + 3
    again = summarize(runs, n_boot=200, seed=report["options"]["seed"])
    assert again["arms"]["lock"]["analogue_mrr"]["value"] == pytest.approx(
        report["test"]["summary"]["arms"]["lock"]["analogue_mrr"]["value"]
    )
    two = summarize([runs, runs], n_boot=200)
    assert two["n_seeds"] == 2
    assert two["arms"]["lock"]["role_mrr"]["value"] == pytest.approx(
        again["arms"]["lock"]["role_mrr"]["value"]
    )
    flat = headline(two)
    for key in ("analogue_top1", "meandiff_analogue_top1", "unsteered_analogue_top1", "role_mrr",
                "meandiff_role_mrr", "unsteered_role_mrr", "judge_shift", "meandiff_judge_shift",
                "fluency_ratio", "diversity_ratio", "n_seeds"):  # fmt: skip
        assert key in flat
    json.dumps(flat, allow_nan=False)


def test_judge_references_come_from_the_train_split(tiny_model):
    from analoglock.data import load_pairs
    from analoglock.lock.judge import unit_mean
    from analoglock.lock.steering import build_task

    judge = FakeJudge()
    task = build_task(tiny_model, judge, "fable_work", "test", SteerOptions(**SMALL))
    train = load_pairs("fable_work", "train")
    torch.testing.assert_close(task.a_centroid, unit_mean(judge.embed([p.a for p in train])))
    torch.testing.assert_close(task.b_centroid, unit_mean(judge.embed([p.b for p in train])))
    test = load_pairs("fable_work", "test")[:4]
    torch.testing.assert_close(task.candidates, judge.embed([p.b for p in test]))
    assert not {p.id for p in train} & {p.id for p in task.prompts}


def test_cli_parses_numbers_and_lists():
    from analoglock.cli.steer import _floats, _strings

    assert _floats("scale", 4) == (4.0,) and _floats("scale", [0, 2]) == (0.0, 2.0)
    with pytest.raises(ValueError, match="scale"):
        _floats("scale", "big")
    assert _strings("roles") == ("roles",) and _strings(["roles", "all"]) == ("roles", "all")


def test_refusals_before_any_generation(tiny_model, artifact, tmp_path):
    judge = FakeJudge()
    with pytest.raises(SteeringError, match="allow_extrapolation"):
        run_steering(tiny_model, artifact, SteerOptions(**{**SMALL, "alphas": (2.0,)}), judge=judge)
    with pytest.raises(SteeringError, match="trained at 'blocks.1.hook_resid_post'.*blocks.2"):
        run_steering(
            tiny_model,
            artifact,
            SteerOptions(**SMALL, hook="blocks.2.hook_resid_post"),
            judge=judge,
        )
    with pytest.raises(SteeringError, match="finite"):
        run_steering(tiny_model, artifact, SteerOptions(**{**SMALL, "scales": (float("nan"),)}))
    with pytest.raises(SteeringError, match="positions"):
        SteerOptions(**{**SMALL, "positions": ("middle",)}).check()
    with pytest.raises(SteeringError, match="must differ"):
        SteerOptions(select_split="test").check()


def test_user_prompts_and_an_artifact_without_control_or_covariance(tiny_model, tmp_path):
    path = make_artifact(tiny_model, tmp_path / "bare", control=False)
    art = load_artifact(path, tiny_model)
    del art.vectors["cov_a"]
    opts = SteerOptions(
        **{**SMALL, "alphas": (1.0,), "positions": ("roles",), "scales": (2.0,), "n_prompts": 2,
           "prompts": ["A tortoise and a hare met.", "Hello there."], "random_norm": "applied"}
    )  # fmt: skip
    rep = run_steering(tiny_model, art, opts, judge=FakeJudge())
    assert "control_map" not in rep["test"]["summary"]["arms"]
    assert rep["test"]["random"]["kind"] == "isotropic"
    assert rep["test"]["split"] == "user prompts" and rep["test"]["n_prompts"] == 2
    # random_norm="applied": controls at the lock's measured per-token displacement.
    applied = rep["test"]["arms"]["lock"]["applied_norm"]
    assert rep["test"]["random"]["norm"] == pytest.approx(applied, rel=1e-5)
    assert rep["test"]["arms"]["meandiff_norm"]["norm"] == pytest.approx(applied, rel=1e-5)
    assert rep["test"]["summary"]["arms"]["lock"]["analogue_mrr"]["value"] is None  # no analogue
    assert "analogue" in rep["generations"][0] and rep["generations"][0]["analogue"] is None
    json.dumps(rep, allow_nan=False)


# ---------------------------------------------------------------- statistics by hand


def _arm(name, judge, rank, ppl, distinct, role, kl):
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    n = len(judge)
    return ArmResult(name, {}, [""] * n, [[]] * n, t(judge), t(rank), t(ppl), t(distinct),
                     torch.zeros(n), t(role), t(kl))  # fmt: skip


BASE = _arm("unsteered", [0.0, 0.0, 0.0, 0.0], [2, 3, 1, 4], [10, 10, 20, 20], [1, 1, 1, 1],
            [4, 4], [0, 0])  # fmt: skip
LOCK = _arm("lock", [0.2, 0.4, 0.0, 0.2], [1, 1, 2, float("nan")], [15, 15, 20, 40],
            [0.5, 1, 1, 1], [1, 2], [0.1, 0.3])  # fmt: skip
MD = _arm("meandiff", [0.1, 0.1, 0.1, 0.1], [2, 2, 2, 2], [10, 10, 20, 20], [1, 1, 1, 1],
          [4, 4], [0.2, 0.2])  # fmt: skip


def test_arm_measures_by_hand():
    m = arm_measures(LOCK, BASE)
    assert m["judge_shift"] == pytest.approx(0.2)
    assert m["analogue_top1"] == pytest.approx(2 / 3)  # the NaN prompt has no analogue
    assert m["analogue_mrr"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["role_top1"] == 0.5 and m["role_mrr"] == pytest.approx(0.75)
    assert m["fluency_ratio"] == pytest.approx(90 / 60)  # ratio of means over the same prompts
    assert m["diversity_ratio"] == pytest.approx(3.5 / 4)
    assert m["neutral_kl"] == pytest.approx(0.2)
    b = arm_measures(BASE, BASE)
    assert b["judge_shift"] == 0 and b["fluency_ratio"] == 1 and b["neutral_kl"] == 0


def test_summarize_intervals_and_paired_tests():
    runs = {"unsteered": BASE, "lock": LOCK, "meandiff": MD}
    s = summarize(runs, n_boot=500, seed=0)
    assert s["n_seeds"] == 1 and s["prompt"] == 4 and s["item"] == 2
    for arm in runs:
        for name, cell in s["arms"][arm].items():
            if cell["value"] is not None and not math.isnan(cell["value"]):
                assert cell["lo"] - 1e-9 <= cell["value"] <= cell["hi"] + 1e-9, (arm, name)
    assert s["arms"]["unsteered"]["judge_shift"] == {"value": 0.0, "lo": 0.0, "hi": 0.0}
    p = s["paired"]["lock_vs_meandiff"]
    assert p["judge_shift"]["diff"] == pytest.approx(0.1)
    assert p["role_mrr"]["diff"] == pytest.approx(0.75 - 0.25)
    assert 0 <= p["judge_shift"]["p_boot"] <= 1
    assert "unsteered_vs_meandiff" in s["paired"] and "meandiff_vs_meandiff" not in s["paired"]
    only = summarize(runs, n_boot=100, compare=["lock"])
    assert list(only["paired"]) == ["lock_vs_meandiff"]


def test_random_p_values_count_in_each_measures_direction():
    observed = {m: 0.5 for m in MEASURES}
    random = [{m: v for m in MEASURES} for v in (0.1, 0.2, 0.6, 0.7)]
    p = random_p_values(observed, random)
    assert p["role_mrr"] == pytest.approx((1 + 2) / 5)  # higher is better: 0.6, 0.7 beat it
    assert p["fluency_ratio"] == pytest.approx((1 + 2) / 5)  # lower is better: 0.1, 0.2 beat it
    observed["judge_shift"] = float("nan")
    assert math.isnan(random_p_values(observed, random)["judge_shift"])


def test_select_prefers_feasible_then_mrr_and_flags_when_none_is():
    opts = SteerOptions()
    rows = [
        {"alpha": 1.0, "norm": 2.0, "analogue_mrr": 0.9, "role_mrr": 0.1, "judge_shift": 0.1,
         "fluency_ratio": 3.0, "diversity_ratio": 1.0},
        {"alpha": 0.5, "norm": 1.0, "analogue_mrr": 0.4, "role_mrr": 0.1, "judge_shift": 0.1,
         "fluency_ratio": 1.2, "diversity_ratio": 0.9},
        {"alpha": 0.25, "norm": 0.5, "analogue_mrr": 0.4, "role_mrr": 0.1, "judge_shift": 0.1,
         "fluency_ratio": 1.0, "diversity_ratio": 1.0},
    ]  # fmt: skip
    pick = select(rows, opts)
    assert pick["alpha"] == 0.25 and pick["constraint_met"]  # ties go to the gentler setting
    bad = [{**r, "diversity_ratio": 0.1} for r in rows]
    pick = select(bad, opts)
    assert not pick["constraint_met"] and pick["alpha"] == 0.25  # the least violating
    assert fluency_matched(rows, 1.25)["alpha"] == 0.5


# ---------------------------------------------------------------- steer.html


def test_steer_html_one_colour_per_arm_in_every_panel(report, tmp_path):
    import html

    from analoglock.reports.steering import ARM_COLOURS, plot_steering

    figs = plot_steering(report, tmp_path / "steer.html")
    page = (tmp_path / "steer.html").read_text()
    assert "<html>" in page and len(page) > 1_000_000  # plotly.js inlined: opens offline
    assert page.count("Plotly.newPlot") == 3
    for g in report["generations"]:
        assert g["id"] in page
    assert html.escape(report["generations"][0]["analogue"][:40]) in page
    assert set(figs) == {"test arms", "random directions", "validation sweep"}
    seen: dict[str, set[str]] = {}
    for fig in figs.values():
        for trace in fig.data:
            arm = trace.legendgroup.removeprefix("chosen ").split(" @ ")[0]
            lines = trace.type == "scatter" and "lines" in (trace.mode or "")
            seen.setdefault(arm, set()).add(trace.line.color if lines else trace.marker.color)
    assert {"unsteered", "lock", "control_map", "meandiff", "random"} <= set(seen)
    for arm, colours in seen.items():  # one colour per arm across every panel, as the legend
        assert colours == {ARM_COLOURS[arm]}, arm


# ---------------------------------------------------------------- CLI


def test_cli_end_to_end(tiny_model, tiny_dir, tmp_path, monkeypatch, capsys):
    from hydra import compose, initialize_config_dir

    from analoglock.cli._conf import CONF_DIR
    from analoglock.cli.steer import print_report, run
    from analoglock.lock.steering import evaluate

    ckpt = make_artifact(tiny_model, tmp_path / "run")
    monkeypatch.setattr(evaluate, "load_judge", lambda: FakeJudge())
    overrides = [
        "model=hf",
        f"model.spec={tiny_dir}",
        f"ckpt={ckpt}",
        "n_prompts=3",
        "alpha=[0.5]",
        "map_positions=[roles,all]",
        "scale=[0,2]",
        "max_new_tokens=3",
        "n_random=2",
        "n_boot=100",
        "progress=false",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="steer", overrides=overrides)
    report = run(cfg)
    saved = json.loads((ckpt / "steer.json").read_text())
    assert saved["test"]["summary"] == report["test"]["summary"]
    assert saved["generations"][0]["prompt"].startswith("Once upon a time, ")
    assert saved["config"]["alpha"] == [0.5]
    assert (ckpt / "steer.html").exists()
    # Mean difference at scale 0 is the unsteered model exactly: no shift, no cost.
    (zero,) = [r for r in saved["sweep"] if r["arm"] == "meandiff" and r["scale"] == 0.0]
    assert zero["judge_shift"] == 0.0 and zero["neutral_kl"] == 0.0
    assert zero["fluency_ratio"] == 1.0 and zero["analogue_mrr"] is not None
    # "center" is a mean activation, never a steering vector.
    assert not any("center" in name for name in saved["per_prompt"])
    print_report(report, n_show=2)
    out = capsys.readouterr().out
    for word in ("unsteered", "lock", "mean diff", "analogue", "role_mrr", "chance"):
        assert word in out


def test_cli_refuses_bad_prompts_before_loading_the_model(tmp_path):
    from hydra import compose, initialize_config_dir

    from analoglock.cli._conf import CONF_DIR
    from analoglock.cli.steer import run
    from analoglock.lock.steering import PromptError

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    overrides = ["model=hf", "model.spec=/nonexistent", f"ckpt={tmp_path}", f"prompts={bad}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="steer", overrides=overrides)
    with pytest.raises(PromptError, match="bad.txt"):
        run(cfg)
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="steer", overrides=[*overrides[:3], "alpha=[1.5]"])
    with pytest.raises(SteeringError, match="allow_extrapolation"):
        run(cfg)


def count_generations(monkeypatch) -> list[int]:
    """Every steered generation run_arm starts, one entry (its number of prompts) per call."""
    from analoglock.lock.steering import arms

    calls: list[int] = []
    real = arms.steered_generate

    def counted(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(arms, "steered_generate", counted)
    return calls


def test_the_unsteered_model_and_each_vector_are_measured_once_per_task(
    tiny_model, artifact, monkeypatch
):
    from analoglock.lock.steering import build_task, map_steering, run_arm, vector_steering

    judge, opts = FakeJudge(), SteerOptions(**SMALL)
    task = build_task(tiny_model, judge, "fable_work", "test", opts)
    calls = count_generations(monkeypatch)

    def vec(scale):
        return vector_steering(tiny_model, HOOK, artifact.vectors["meandiff"], scale, "all")

    def arm(steering, name):
        return run_arm(tiny_model, task, steering, judge, name, 4, 16)

    first, again = arm(None, "unsteered"), arm(None, "again")
    md, md_best, md3 = arm(vec(2.0), "meandiff"), arm(vec(2.0), "meandiff_best"), arm(vec(3.0), "x")
    lock = map_steering(tiny_model, artifact.mapper, HOOK, 0.5, "all")
    arm(lock, "lock"), arm(lock, "lock_again")  # a map is always measured
    assert len(calls) == 5
    assert again.name == "again" and again.texts == first.texts
    assert md_best.name == "meandiff_best" and md_best.spec["scale"] == 2.0
    assert md3.texts != md.texts
    # what is reused is what a fresh measurement on a fresh task gives
    fresh = run_arm(
        tiny_model, build_task(tiny_model, judge, "fable_work", "test", opts), vec(2.0), judge,
        "meandiff", 4, 16,
    )  # fmt: skip
    assert fresh.texts == md_best.texts and fresh.new_tokens == md_best.new_tokens
    for key in ArmResult._TENSORS:
        torch.testing.assert_close(getattr(fresh, key), getattr(md_best, key), equal_nan=True)


def test_steer_seeds_summarises_over_run_directories(tiny_model, tiny_dir, tmp_path, monkeypatch):
    from analoglock.lock.steering import steer_seeds
    from analoglock.lock.steering.bench import load_model_from_config

    dirs = [make_artifact(tiny_model, tmp_path / f"seed{k}", seed=k) for k in range(2)]
    small = {**SMALL, "alphas": (1.0,), "positions": ("all",), "scales": (2.0,), "n_random": 2,
             "n_prompts": 2}  # fmt: skip
    calls = count_generations(monkeypatch)
    out = steer_seeds(dirs, model=tiny_model, judge=FakeJudge(), **small)
    # seed 0 generates 11 arms: validation unsteered, lock, meandiff; test unsteered, lock,
    # control map, meandiff (meandiff_best is the same setting), asked, meandiff at the lock's
    # norm, 2 random directions. Seed 1 shares the tasks: only its own maps and the controls at
    # its norm are new (validation lock; test lock, control, meandiff_norm, 2 random).
    assert len(calls) == 11 + 6
    assert out["n_seeds"] == 2 and out["n_prompts"] == 2
    for key in ("analogue_top1", "meandiff_analogue_top1", "unsteered_role_mrr", "fluency_ratio"):
        assert key in out and f"{key}_ci" in out
    assert len(out["steer_choices"]) == 2 and out["steer_choices"][0]["alpha"] == 1.0
    assert "lock_vs_meandiff" in out["steer_summary"]["paired"]
    json.dumps(out, allow_nan=False)
    for d in dirs:
        saved = json.loads((d / "steer.json").read_text())
        assert saved["ckpt"] == str(d)
    loaded = load_model_from_config(["model=hf", f"model.spec={tiny_dir}"])
    assert loaded.cfg.d_model == 64
