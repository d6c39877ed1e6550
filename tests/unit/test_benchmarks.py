"""Every scripts/bench_*.py runs on a fresh checkout (it makes its own inputs) on the tiny model,
and prints the JSON keys docs/benchmarks.md reads, so a benchmark cannot silently rot."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_script(name: str, *args: str, cwd: Path) -> dict:
    """Run a benchmark script as `python scripts/NAME ARGS` would, in a fresh directory (no runs/,
    no cache of ours), and parse the JSON it prints.

    In this process, not a child: a child pays ~10 s importing torch and transformer_lens again,
    ~100 s of the suite over these scripts. What a script may change in the process (its working
    directory, argv, torch's thread count, environment) is put back afterwards."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(cwd)
        mp.setattr(sys, "argv", [str(SCRIPTS / name), *args])
        for key, value in {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}.items():
            mp.setenv(key, value)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            runpy.run_path(str(SCRIPTS / name), run_name="__main__")
        finally:
            torch.set_num_threads(threads)
    return json.loads(out.getvalue())


def test_bench_harvest(tiny_dir, tmp_path):
    out = run_script("bench_harvest.py", "--model", tiny_dir, "--hooks", "blocks.1.hook_resid_post", "last",
                     "--rows", "2", "--ctx", "16", "--ragged-docs", "6", "--ragged-batch", "3",
                     "--repeats", "1", cwd=tmp_path)  # fmt: skip
    paths = {"harvester", "run_with_cache_filtered_stop", "run_with_cache_full", "hf_forward"}
    for workload in ("fixed", "ragged"):
        by_hook = out[workload]["by_hook"]
        assert set(by_hook) == {"blocks.1.hook_resid_post", "blocks.3.hook_resid_post"}
        for row in by_hook.values():
            assert set(row["tokens_per_s"]) == set(row["flop_efficiency_vs_hf"]) == paths
            assert row["flop_efficiency_vs_hf"]["hf_forward"] == 1.0
            assert row["speedup_vs_run_with_cache_filtered_stop"] > 0
    assert out["fixed"]["by_hook"]["blocks.1.hook_resid_post"]["padding_fraction_of_baselines"] == 0  # fmt: skip
    assert out["ragged"]["by_hook"]["blocks.3.hook_resid_post"]["real_tokens"] > 0


def test_bench_bases(tiny_dir, tmp_path):
    out = run_script("bench_bases.py", str(tmp_path / "h"), "--model", tiny_dir, "--hook", "blocks.1.hook_resid_post",
                     "--docs", "40", "--n-features", "4", "--sae-width", "16", "--sae-k", "4", "--sae-batch", "64",
                     "--sae-tokens", "640", "--splice", "--splice-docs", "2", "--speed-steps", "2",
                     "--repeats", "1", cwd=tmp_path)  # fmt: skip
    assert (tmp_path / "h" / "meta.json").exists()  # made its own harvest
    assert set(out["bases"]) == {"svd", "pca", "nmf", "cca", "sae"}
    ce = ("heldout/ce_increase", "heldout/ce_recovered", "heldout/ce_recovered_vs_mean", "heldout/mean_ablation_ce")  # fmt: skip
    for kind in ("svd", "pca", "nmf", "sae"):
        assert {"fit_s", "heldout/fvu", "heldout/l0", *ce} <= set(out["bases"][kind])
        row = out["bases"][kind]  # intervals over held-out documents, and how many
        for key in ("fvu", "ce_increase", "ce_recovered", "ce_recovered_vs_mean"):
            lo, hi = row[f"heldout/{key}_ci95"]  # containment: bases/test_fit.py (on the tiny
            assert lo <= hi, (kind, key)  # model CE moves ~1e-3 nats: float32 rounding shows)
        assert row["heldout/bootstrap"]["n_docs"]["ce_increase"] == 2
        assert row["heldout/bootstrap"]["n_docs"]["fvu"] >= 2
    assert set(out["bases"]["cca"]["heldout/by_view"]) == {"story", "roles"}
    speed = out["sae_training_speed"]
    assert {"ours_tokens_per_s", "saelens_trainer_tokens_per_s", "cost_ratio_ours_over_saelens"} <= set(speed)  # fmt: skip


def test_bench_bases_compare(tiny_model, tmp_path):
    """--compare: A minus B per held-out number both fits hold, paired over their documents."""
    from analoglock.activations import harvest_to_disk
    from analoglock.bases.fit import fit_basis_on_store
    from tests.helpers import shipped_docs

    hook = "blocks.1.hook_resid_post"
    harvest_to_disk(tiny_model, shipped_docs(n=10), [hook], tmp_path / "h", progress=False)
    ma = fit_basis_on_store(tmp_path / "h", "pca", 8, tmp_path / "a")
    mb = fit_basis_on_store(tmp_path / "h", "svd", 2, tmp_path / "b")
    out = run_script("bench_bases.py", "--compare", str(tmp_path / "a"), str(tmp_path / "b"),
                     "--n-boot", "200", cwd=tmp_path)  # fmt: skip
    assert set(out["differences"]) == {"fvu"}  # no model: no spliced CE to compare
    d = out["differences"]["fvu"]
    assert d["n_docs"] == 2 and d["n_boot"] == 200 and d["key"] == "heldout/fvu"
    assert abs(d["difference"] - (ma["heldout/fvu"] - mb["heldout/fvu"])) < 1e-9
    assert d["ci95"][0] <= d["difference"] <= d["ci95"][1] < 0  # 8 directions beat 2 on both


def test_bench_patch(tiny_dir, tmp_path):
    kind = "pca"  # the PCA x PCA row of docs/benchmarks.md (the SAE stand-in is the slow default)
    out = run_script("bench_patch.py", "--model", tiny_dir, "--h1", "blocks.0.hook_resid_post", "--h2", "blocks.2.hook_resid_post",
                     "--harvest", str(tmp_path / "h"), "--docs", "12", "--upstream-kind", kind, "--width", "8",
                     "--n-up", "8", "--n-down", "4", "--prompts", "2", "--max-length", "12", "--fit-rows", "300",
                     "--n-partial", "4", "--compare-full", "2", "--n-boot", "300", "--seed", "1",
                     cwd=tmp_path)  # fmt: skip
    keys = {"exact_s", "attribution_s", "speedup", "spearman", "topk_overlap", "sign_agreement",
            "spearman_vs_partial_0.1", "control_mean_abs_over_effect_mean_abs", "rerun_vs_full_forward"}  # fmt: skip
    assert keys <= set(out) and out["upstream_basis"] == kind and out["n_upstream"] == 8
    # every comparison has n, seeds and a bootstrap interval over upstream features holding its point
    intervals = {"spearman", "spearman_top200", "topk_overlap", "sign_agreement", "sign_agreement_top200",
                 "pearson", "spearman_vs_partial_0.1", "spearman_vs_exact_same_subset",
                 "pearson_vs_partial_0.1", "spearman_partial_minus_exact_same_subset", "effect_minus_control"}  # fmt: skip
    wanted = {f"{k}_ci95" for k in intervals}
    assert wanted <= set(out), sorted(wanted - set(out))
    for k in intervals:
        lo, hi = out[f"{k}_ci95"]
        point = out[k] if k in out else out[f"{k}_mean"]
        assert lo <= point <= hi, (k, lo, point, hi)
    assert (out["n_downstream"], out["n_prompts"], out["n_boot"], out["seed"]) == (4, 2, 300, 1)
    assert out["n_upstream_control"] == 8 and out["n_edges_control"] == 8 * 4
    assert 0 <= out["n_edges_beating_control"] <= 32
    assert 0 <= out["n_upstream_effect_above_control"] <= 8


def test_bench_load(tiny_dir, tmp_path):
    out = run_script("bench_load.py", "--model", tiny_dir, "--runs", "1", "--cold-runs", "1", cwd=tmp_path)  # fmt: skip
    assert {"warm_load_s", "cold_load_s", "breakdown", "n_runs", "load_average"} <= set(out)
    assert out["warm_load_s"] > 0 and out["cold_load_s"] > 0 and out["n_runs"] == 1
    assert {"tokenizer_s", "weights_s", "bridge_boot_s", "first_forward_s"} <= set(out["breakdown"])
    assert {"import_transformer_lens_s", "load_model_s"} <= set(out["cold_breakdown"])


def test_bench_decode(tiny_dir, tmp_path):
    out = run_script("bench_decode.py", "--model", tiny_dir, "--batch-size", "3", "--new-tokens", "5",
                     "--mode", "greedy", "--runs", "1", "--profile-steps", "1", cwd=tmp_path)  # fmt: skip
    keys = {"tokens_per_s", "hf_tokens_per_s", "roofline_tokens_per_s", "roofline_fraction",
            "batch_size", "new_tokens", "n_runs", "load_average"}  # fmt: skip
    assert keys <= set(out) and out["batch_size"] == 3 and out["n_runs"] == 1
    assert out["roofline_fraction"] > 0 and out["roofline_tokens_per_s"] > 0
    # the roofline counts each row's tokens: padding only ever made it lower
    assert out["prompt_tokens_mean"] <= out["prompt_tokens"]
    assert out["padded_roofline_tokens_per_s"] <= out["roofline_tokens_per_s"]
    assert out["same_greedy_tokens_as_hf"] and out["same_tokens_as_default_cache"]
    assert out["same_tokens_as_bridge"] and out["bridge_tokens_per_s"] > 0
    assert out["profile_ms_per_step"] and all(v >= 0 for v in out["profile_ms_per_step"].values())
    out = run_script("bench_decode.py", "--model", tiny_dir, "--batch-size", "3", "--new-tokens", "5",
                     "--runs", "1", "--paths", "bridge", "hf_sampling", cwd=tmp_path)  # fmt: skip
    # sampled: the tiny random model's near-tied logits may order differently under SDPA than
    # under the bridge's attention, so the draws may differ (greedy ones may not, above)
    assert out["mode"] == "sample" and isinstance(out["same_tokens_as_bridge"], bool)
    assert out["hf_sampling_tokens_per_s"] > 0 and "same_greedy_tokens_as_hf" not in out
    assert "default_cache_tokens_per_s" not in out and "hf_tokens_per_s" not in out  # not asked


def test_decode_roofline_counts_tokens_not_padding():
    roofline = runpy.run_path(str(SCRIPTS / "bench_decode.py"))["roofline_seconds"]
    shape = {"linear_params": 10**6, "unembed_params": 10**5, "embed_dim": 64, "n_layers": 2,
             "n_heads": 4, "n_kv_heads": 2, "d_head": 16}  # fmt: skip
    ragged = sum(roofline(shape, [40, 66], 8, 1e11, 1e10))
    padded = sum(roofline(shape, [66, 66], 8, 1e11, 1e10))
    assert ragged < padded
    # compute-bound at this bandwidth: 106 tokens through the blocks, 2 unembedded, and
    # attention over half of each row's square of its own tokens
    prefill, decode = roofline(shape, [40, 66], 1, 1e11, 1e20)
    flops = 2 * 10**6 * 106 + 2 * 10**5 * 2 + 4 * 2 * 4 * 16 * (40**2 + 66**2) / 2
    assert prefill == pytest.approx(flops / 1e11) and decode == 0


def test_bench_kernels(tmp_path):
    # --model (the samplers on a model's own logits) is left out: loading a model here costs
    # ~20 s of the suite's time budget; the default path runs the same timing code
    out = run_script("bench_kernels.py", "--batch", "3", "--layers", "2", "--d-model", "64",
                     "--d-mlp", "96", "--vocab", "300", "--repeats", "1", cwd=tmp_path)  # fmt: skip
    assert set(out["linear_ms"]["3"]) >= {"float32", "bfloat16", "int8_weight_only"}
    assert 0 < out["int8_relative_error"] < 0.02  # 8-bit rows: ~0.5% error, not garbage
    assert out["sampling_ms"]["3"]["transformers"] > 0 and out["sampling_ms"]["3"]["speedup"] > 0


def test_bench_lock(tiny_dir, tmp_path, monkeypatch):
    """Selection on validation, seeds, steering on test: every stage, tiny sizes, the issue's keys."""
    monkeypatch.setenv("ANALOGLOCK_CACHE", str(tmp_path / "cache"))
    out = run_script("bench_lock.py", "--model", tiny_dir, "--layers", "1", "2", "--layer-sets", "1,3",
                     "--maps", "translation",
                     "--epochs", "1", "--seeds", "1", "--n-random", "2", "--n-prompts", "2",
                     "--max-new-tokens", "4", "--alpha", "1.0", "--map-positions", "all", "--scale", "2",
                     "--ref-split", "validation", "--threads", "1", "--out", str(tmp_path / "bench"), cwd=tmp_path)  # fmt: skip
    keys = {"n_seeds", "analogue_top1", "meandiff_analogue_top1", "unsteered_analogue_top1", "role_mrr",
            "meandiff_role_mrr", "unsteered_role_mrr", "judge_shift", "meandiff_judge_shift",
            "fluency_ratio", "diversity_ratio"}  # fmt: skip
    assert keys <= set(out), sorted(keys - set(out))
    assert out["n_seeds"] == 1 and out["selected"]["hook"] in {
        "blocks.1.hook_resid_post",
        "blocks.2.hook_resid_post",
    }
    sel = json.loads((tmp_path / "bench" / "selection.json").read_text())
    # 2 layers and 1 set of layers (1 and 3 side by side) x 1 map, scored on validation only;
    # the set is never chosen: a map steers at one hook
    assert [r["hook"] for r in sel["table"]] == [
        "blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.1+3.hook_resid_post"
    ]  # fmt: skip
    assert [r["steerable"] for r in sel["table"]] == [True, True, False]
    assert all(0 <= row["val_top1_assign"] <= 1 for row in sel["table"])  # the analogy in a pair
    assert "top1_assign" in out["test_role_retrieval"]["0"]["learned"]
    # the lock's map plus the mean difference, on one of the seeds just trained
    both = run_script("steer_combined.py", str(tmp_path / "bench" / "seed0"), "--model", tiny_dir,
                      "--split", "train", "--ref-split", "validation", "--n-prompts", "2",
                      "--alpha", "1", "--scale", "2", "4", "--max-new-tokens", "4", "--threads", "1",
                      "--n-boot", "50", cwd=tmp_path)  # fmt: skip
    arms = [r["arm"] for r in both["rows"]]
    assert arms == ["unsteered", "meandiff_2", "meandiff_4", "lock_1", "lock_1+meandiff_2",
                    "lock_1+meandiff_4", "control_1+meandiff_2", "control_1+meandiff_4"]  # fmt: skip
    assert set(both["above_meandiff_curve"]) == set(both["paired"]) == {a for a in arms if "+" in a}
    curve = sorted((r["judge_shift"], r["analogue_mrr"]) for r in both["rows"][:3])
    for r in both["rows"][4:]:  # above the curve = MRR minus the curve's, linear, clamped
        want = r["analogue_mrr"] - np.interp(r["judge_shift"], *zip(*curve, strict=True))
        assert both["above_meandiff_curve"][r["arm"]] == pytest.approx(want)
    cell = both["paired"]["lock_1+meandiff_2"]["analogue_mrr"]
    assert cell["lo"] <= cell["hi"]


def test_retell_by_prompting(tiny_dir, tmp_path):
    """The prompting ceiling: unsteered, asked (the tiny model has a chat template) and few-shot."""
    out = run_script("retell_by_prompting.py", "--model", tiny_dir, "--n", "3", "--shots", "1",
                     "--max-new-tokens", "3", "--ref-split", "validation", "--threads", "1",
                     cwd=tmp_path)  # fmt: skip
    assert out["n_prompts"] == 3 and out["n_candidates"] == 3 and out["instruction"]
    for arm in ("unsteered", "asked", "fewshot"):
        assert 0 <= out[arm]["analogue_top1"] <= 1 and 1 / 3 <= out[arm]["analogue_mrr"] <= 1
    for arm in ("asked", "fewshot"):
        mean, lo, hi = out[arm]["analogue_mrr_minus_unsteered"]
        assert lo <= mean <= hi
