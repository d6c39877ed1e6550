"""Benchmark exact vs attribution patching on SmolLM2: layer-6 features -> layer-12 PCA codes.

Prints ONE JSON object: n_upstream, n_downstream, exact_s, attribution_s, speedup, spearman,
topk_overlap, sign_agreement (attribution vs exact full ablation over all pairs), the same against
10% partial ablation (the linear regime), the random-direction controls' scale, and the cost of
the block rerun vs a full forward with a hook (+ stop_at_layer) on the same interventions.

Every agreement number has a `<key>_ci95`: a percentile bootstrap over UPSTREAM features (rows of
the effect matrices; each is an independent intervention, its downstream codes are not), n_boot
resamples seeded with --seed (`patching.agreement_bootstrap`). The controls are compared per
upstream feature, paired (`patching.control_contrast`: mean |effect| - mean |control| over its
downstream codes, with a bootstrap interval, and the edges passing graph.json's beats_control rule).
--seed also picks the fit rows and the control directions.

Upstream: a saved basis (--upstream DIR) or, by default, a stand-in fit here on a harvest of
blocks.6.hook_resid_post (positions=all of fable_work, made here on a fresh clone): an SAE when
analoglock.bases has one (`sae`), else NMF (overcomplete: PCA/SVD cannot exceed d_model = 576
directions); `--upstream-kind pca --width 64` gives the PCA 64 x PCA 64 row. Only features
active on the prompt set are patched. Downstream: PCA 64 at blocks.12.hook_resid_post.
Timings are wall clock on a shared machine: the JSON records the load average.

    .venv/bin/python scripts/bench_patch.py [--n-up 1024] [--prompts 8] [--max-length 32]
    .venv/bin/python scripts/bench_patch.py --upstream-kind pca --width 64 --n-up 64  # PCA 64 x 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

H1, H2 = "blocks.6.hook_resid_post", "blocks.12.hook_resid_post"  # the defaults of --h1, --h2


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--harvest", default="runs/harvest/fable_work-all-l6l12")
    p.add_argument(
        "--upstream", default=None, help="a saved basis dir at blocks.6 (default: fit a stand-in)"
    )
    p.add_argument("--upstream-kind", default="auto", choices=["auto", "sae", "nmf", "pca"])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--h1", default=H1)
    p.add_argument("--h2", default=H2)
    p.add_argument("--docs", type=int, default=None, help="stories in a harvest made here")
    p.add_argument("--width", type=int, default=2048, help="stand-in basis width")
    p.add_argument(
        "--n-up", type=int, default=1024, help="upstream features to patch (most active)"
    )
    p.add_argument("--n-down", type=int, default=64)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--fit-rows", type=int, default=8000)
    p.add_argument(
        "--n-partial", type=int, default=256, help="upstream features in the alpha=0.1 check"
    )
    p.add_argument(
        "--compare-full", type=int, default=16, help="features timed through the full-forward path"
    )
    p.add_argument(
        "--n-control", type=int, default=64, help="upstream features rerun with their controls"
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of upstream rows")
    p.add_argument("--seed", type=int, default=0, help="fit rows, control directions, bootstrap")
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args()


def harvest_if_missing(model, out: str, hooks: list[str], n_docs: int | None = None):
    """The h1/h2 harvest of fable_work (positions=all), made once."""
    from analoglock.activations import ActivationStore, harvest_to_disk
    from analoglock.data import load_documents

    if (Path(out) / "meta.json").exists():
        store = ActivationStore(out)
        if store.meta.get("complete") and set(hooks) <= set(store.hooks):
            return store
    docs = load_documents("fable_work")[:n_docs]
    return harvest_to_disk(model, docs, hooks, out, dataset="fable_work")


def fit_upstream(kind: str, x: torch.Tensor, width: int, hook: str):
    """The stand-in upstream basis (SAE when available, else NMF; or PCA), fit on h1 rows."""
    from analoglock import bases

    if kind == "auto":
        try:
            return fit_upstream("sae" if "sae" in bases.BASES else "nmf", x, width, hook)
        except Exception as err:  # noqa: BLE001 - the SAE trainer is optional here; say why it fell back
            logging.warning("SAE stand-in failed (%s); using NMF", err)
            return fit_upstream("nmf", x, width, hook)
    if kind == "sae":
        basis = bases.build_basis("sae", n_components=width, hook=hook, architecture="topk", k=min(32, width),
                                  n_tokens=20 * len(x), batch_size=min(1024, len(x)), logger="none", progress=False)  # fmt: skip
    elif kind == "pca":
        basis = bases.build_basis("pca", n_components=width, hook=hook)
    else:
        basis = bases.build_basis("nmf", n_components=width, hook=hook, n_iter=100, encode_steps=50)
    return kind, basis.fit(x)


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from analoglock.bases import PCABasis, load_basis
    from analoglock.data import load_documents
    from analoglock.model import load_model
    from analoglock.patching import (
        Ablate,
        Segment,
        agreement_bootstrap,
        attribution_effects,
        build_prompts,
        clean_runs,
        control_contrast,
        exact_effects,
    )
    from analoglock.stats import percentile_interval

    load0 = os.getloadavg()[0]
    h1, h2 = args.h1, args.h2
    model = load_model(args.model)
    store = harvest_if_missing(model, args.harvest, [h1, h2], args.docs)
    acts = store.load([h1, h2])
    rows = torch.randperm(len(acts.doc), generator=torch.Generator().manual_seed(args.seed))[
        : args.fit_rows
    ]
    t0 = time.perf_counter()
    if args.upstream:
        kind, U = "saved", load_basis(args.upstream)
    else:
        kind, U = fit_upstream(args.upstream_kind, acts.acts[h1][rows].float(), args.width, h1)
    fit_s = time.perf_counter() - t0
    V = PCABasis(args.n_down, hook=h2).fit(acts.acts[h2].float())
    docs = load_documents("fable_work", split="test", side="a", limit=args.prompts)
    seg = Segment(model, h1, h2)
    prompts = build_prompts(model, docs, max_length=args.max_length)
    cleans = clean_runs(seg, prompts, progress=False)
    with torch.no_grad():
        codes = torch.cat([U.encode(c.x1)[c.intervene] for c in cleans])
    active = (codes != 0).any(0)
    strength = codes.abs().mean(0).masked_fill(~active, -1)
    n_up = min(args.n_up, int(active.sum()))
    up = strength.topk(n_up).indices.sort().values
    kw = dict(upstream_ids=up, control=False, progress=True)
    ex = exact_effects(seg, cleans, U, V, Ablate(1.0), **kw)
    at = attribution_effects(seg, cleans, U, V, Ablate(1.0), **kw)
    sub = up[: args.n_partial]  # the linear-regime check on a subset: it costs as much as exact
    partial = exact_effects(seg, cleans, U, V, Ablate(0.1), upstream_ids=sub, control=False)
    ctrl = exact_effects(seg, cleans, U, V, Ablate(1.0), upstream_ids=up[: args.n_control], control=True,
                         seed=args.seed, progress=False)  # fmt: skip
    # the alternative to the block rerun: a hook adding the delta at h1 in a full forward
    few = up[: args.compare_full]
    t1 = time.perf_counter()
    exact_effects(seg, cleans, U, V, Ablate(1.0), upstream_ids=few, control=False, progress=False)
    rerun_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    with torch.no_grad():
        for c in cleans:
            a = U.encode(c.x1)
            delta = (-a[:, few] * c.intervene[:, None]).T.unsqueeze(-1) * U.directions[
                few
            ].unsqueeze(1)
            seg.run_full(c.ids, delta)
    full_s = time.perf_counter() - t2
    t3 = time.perf_counter()
    boot = dict(k=200, n_boot=args.n_boot, seed=args.seed, level=0.95)
    b_exact = agreement_bootstrap(ex, at, **boot)
    b_partial = agreement_bootstrap(partial.effect / 0.1, at.effect[: len(sub)], **boot)
    b_sub = agreement_bootstrap(ex.effect[: len(sub)], at.effect[: len(sub)], **boot)
    vs_exact, vs_partial, vs_exact_sub = b_exact["point"], b_partial["point"], b_sub["point"]
    # b_partial and b_sub resample the same rows (same seed, same n): their difference is paired
    paired = b_partial["replicates"]["spearman"] - b_sub["replicates"]["spearman"]
    cc = control_contrast(ctrl.effect, ctrl.control, n_boot=args.n_boot, seed=args.seed)
    boot_s = time.perf_counter() - t3

    def ci(b: dict, stat: str) -> list[float]:
        return [round(v, 4) for v in b["ci"][stat]]

    out = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "load_average_start": round(load0, 2),
        "load_average_end": round(os.getloadavg()[0], 2),
        "upstream_basis": kind,
        "upstream_width": int(U.n_features),
        "upstream_fit_s": round(fit_s, 1),
        "hooks": [h1, h2],
        "n_prompts": len(prompts),
        "n_positions": ex.n_positions,
        "n_upstream": int(len(up)),
        "n_upstream_active": int(active.sum()),
        "n_downstream": int(V.n_features),
        "exact_s": round(ex.seconds, 2),
        "attribution_s": round(at.seconds, 2),
        "speedup": round(ex.seconds / at.seconds, 2),
        "spearman": round(vs_exact["spearman"], 4),
        "spearman_top200": round(vs_exact["spearman_topk"], 4),
        "topk_overlap": round(vs_exact["topk_overlap"], 4),
        "sign_agreement": round(vs_exact["sign_agreement"], 4),
        "sign_agreement_top200": round(vs_exact["sign_agreement_topk"], 4),
        "pearson": round(vs_exact["pearson"], 4),
        "spearman_ci95": ci(b_exact, "spearman"),
        "spearman_top200_ci95": ci(b_exact, "spearman_topk"),
        "topk_overlap_ci95": ci(b_exact, "topk_overlap"),
        "sign_agreement_ci95": ci(b_exact, "sign_agreement"),
        "sign_agreement_top200_ci95": ci(b_exact, "sign_agreement_topk"),
        "pearson_ci95": ci(b_exact, "pearson"),
        "topk": vs_exact["topk"],
        "n_boot": args.n_boot,
        "seed": args.seed,
        "bootstrap": "percentile 95%, resampling upstream features (rows) with replacement",
        "bootstrap_s": round(boot_s, 1),
        "n_upstream_partial_check": len(sub),
        "spearman_vs_partial_0.1": round(vs_partial["spearman"], 4),
        "spearman_vs_exact_same_subset": round(vs_exact_sub["spearman"], 4),
        "pearson_vs_partial_0.1": round(vs_partial["pearson"], 4),
        "spearman_vs_partial_0.1_ci95": ci(b_partial, "spearman"),
        "spearman_vs_exact_same_subset_ci95": ci(b_sub, "spearman"),
        "pearson_vs_partial_0.1_ci95": ci(b_partial, "pearson"),
        "spearman_partial_minus_exact_same_subset": round(
            vs_partial["spearman"] - vs_exact_sub["spearman"], 4
        ),
        "spearman_partial_minus_exact_same_subset_ci95": [
            round(v, 4) for v in percentile_interval(paired, 0.95)
        ],
        "control_mean_abs_over_effect_mean_abs": round(
            float(ctrl.control.abs().mean() / ctrl.effect.abs().mean()), 4
        ),  # fmt: skip
        "n_upstream_control": cc["n_upstream"],
        "effect_minus_control_mean": float(f"{cc['effect_minus_control_mean']:.4g}"),
        "effect_minus_control_ci95": [float(f"{v:.4g}") for v in cc["effect_minus_control_ci"]],
        "n_upstream_effect_above_control": cc["n_upstream_effect_above_control"],
        "n_edges_control": cc["n_edges"],
        "n_edges_beating_control": cc["n_edges_beating_control"],
        "rerun_vs_full_forward": {
            "features": len(few),
            "rerun_s": round(rerun_s, 2),
            "full_forward_s": round(full_s, 2),
            "ratio": round(full_s / rerun_s, 2),
        },  # fmt: skip
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
