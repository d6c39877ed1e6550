"""Benchmark every feature basis on one harvest, and our SAE training loop against SAELens's own.

Part 1, quality: svd, pca, nmf, cca (n_features each) and a SAELens SAE (sae_width latents), fit
on the same harvest by `fit_basis_on_store` (its default split: a fable_work harvest is fit on
the train split, the other splits held out): fit seconds, held-out FVU, l0, dead fraction, and
with --splice the spliced CE on held-out documents (increase in nats; recovered against zero- and
mean-ablation, the mean taken over the training tokens).

Inputs: the harvest directory given, made here first when it does not exist (all tokens of the
shipped fable_work stories at --hook, with --model), so the script runs on a fresh clone.

Part 2, speed: tokens/s of our path (`train_sae`: Lightning around SAELens's
`training_forward_pass`) and of SAELens's `SAETrainer.fit()` (the loop that SAELens's own
`LanguageModelSAETrainingRunner` hands its activations to) on the same training rows, with the
same architecture, width, k, batch and steps, each timed whole (scale estimate, loop, and ours
also its Lightning setup and inference export), alternating, median of --repeats.
The runner itself is not timed: it builds its own model through `sae_lens.load_model`
(HookedTransformer names from the hub) or takes a HookedRootModule, and reads activations from a
tokenized HF dataset or its own HF-datasets activation cache of [seq, context, d] blocks, while
ours are a row store of a TransformerBridge harvest; it would then hand the rows to this same
`SAETrainer`. Timings on a shared CPU are noisy.

    python scripts/bench_bases.py [runs/harvest/fable_work-all] [--splice] [--sae-tokens 200000]
    python scripts/bench_bases.py /tmp/h --model PATH --hook blocks.1.hook_resid_post --docs 20  # a toy run

Every held-out number comes with a 95% bootstrap interval over held-out documents (`_ci95`;
`heldout/bootstrap` gives n_boot, the seed and the documents behind each). --compare DIR_A DIR_B
runs nothing else: for two `analoglock-fit-basis` out_dirs fit on the same harvest and split, it
prints A minus B for each held-out number both hold, with a paired bootstrap interval over the
documents both were measured on (`bases.fit.paired_difference`).

    python scripts/bench_bases.py --compare runs/bases/pca-64 runs/bases/sae [--compare-key fvu]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from analoglock.activations import ActivationStore, harvest_to_disk
from analoglock.atomic import finite
from analoglock.bases import load_basis
from analoglock.bases.fit import (
    comparable_keys,
    fit_basis_on_store,
    fit_documents,
    paired_difference,
    resolve_split,
)
from analoglock.bases.quality import heldout_intervals, splice_quality_per_doc
from analoglock.bases.sae_train import (
    RowBatches,
    SAETrainConfig,
    rows_from_store,
    train_sae,
    training_sae_config,
)


def doc_split(store: ActivationStore):
    """fit_basis_on_store's document masks (fit, held out) for this harvest (seed 0)."""
    docs = store.docs()
    return fit_documents(docs, resolve_split("auto", docs), 0.2, 0)


def ensure_harvest(args) -> None:
    """The harvest the benchmark reads, made here when `args.acts` does not exist yet."""
    if Path(args.acts).exists():
        return
    from analoglock.data import load_documents
    from analoglock.model import load_model

    docs = load_documents("fable_work")[: args.docs]
    print(f"[bench] harvesting {len(docs)} fable_work stories into {args.acts}", file=sys.stderr)
    model = load_model(args.model)
    harvest_to_disk(model, docs, [args.hook], args.acts, dataset="fable_work", progress=False)


def fit_all(args, model) -> dict[str, Any]:
    """fit_basis_on_store for every kind (fit_s: fit + held-out reconstruction), then spliced CE."""
    sae_opts = {"k": args.sae_k, "n_tokens": args.sae_tokens, "batch_size": args.sae_batch,
                "lr": args.sae_lr, "logger": "none", "progress": False}  # fmt: skip
    store = ActivationStore(args.acts)
    hook = store.hooks[0]
    train, held = doc_split(store)
    held_docs = [d for d, h in zip(store.docs(), held.tolist(), strict=True) if h]
    mean = rows_from_store(store, hook, doc_mask=train).double().mean(0)  # mean ablation's value
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("svd", "pca", "nmf", "cca", "sae"):
            width = args.sae_width if kind == "sae" else args.n_features
            t0 = time.perf_counter()
            m = fit_basis_on_store(args.acts, kind, width, Path(tmp) / kind, splice_docs=0,
                                   basis_kwargs=sae_opts if kind == "sae" else None)  # fmt: skip
            row = {"n_features": width, "fit_s": round(time.perf_counter() - t0, 2)}
            row.update(
                {
                    k: v
                    for k, v in m.items()
                    if k.startswith("heldout/") and (k.endswith("_ci95") or not isinstance(v, list))
                }
            )
            if kind == "sae":
                row["training"] = m["sae_training"]
            if model is not None and kind != "cca":  # CCA reconstructs per domain, not one stream
                basis = load_basis(Path(tmp) / kind)
                docs = held_docs[: args.splice_docs]
                summary, ce = splice_quality_per_doc(model, docs, hook, basis.forward, mean)
                row.update({f"heldout/{k}": v for k, v in summary.items()})
                boot = row.get("heldout/bootstrap")
                for k, v in heldout_intervals({"ce": ce}).items():
                    if k == "bootstrap" and boot is not None:  # fvu's, from the fit: add ce's
                        v = {**v, "n_docs": {**boot["n_docs"], **v["n_docs"]}}
                    row[f"heldout/{k}"] = v
            out[kind] = row
            print(f"[bench] {kind}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return out


def ours(x: torch.Tensor, args, steps: int) -> float:
    """Seconds for our whole train_sae call (scale estimate, Lightning loop, export)."""
    cfg = SAETrainConfig(sae={"k": args.sae_k}, n_tokens=steps * args.sae_batch,
                         batch_size=args.sae_batch, lr=args.sae_lr, logger="none",
                         progress=False, init_b_dec_to_mean=False)  # fmt: skip
    t0 = time.perf_counter()
    train_sae(x, args.sae_width, cfg)
    return time.perf_counter() - t0


def theirs(x: torch.Tensor, args, steps: int) -> float:
    """Seconds for SAELens's SAETrainer.fit() on the same rows, batches and SAE config."""
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class

    def provider():
        rows = RowBatches(x, args.sae_batch, seed=0)
        while True:
            yield from rows

    t0 = time.perf_counter()
    torch.manual_seed(0)
    sae_cfg = training_sae_config("topk", x.shape[1], args.sae_width, {"k": args.sae_k}, True)
    sae = get_sae_training_class("topk")[0](sae_cfg)
    cfg = SAETrainerConfig(
        total_training_samples=steps * args.sae_batch,
        train_batch_size_samples=args.sae_batch,
        lr=args.sae_lr,
        lr_end=args.sae_lr / 10,
        dead_feature_window=200,
        n_batches_for_norm_estimate=max(1, len(x) // args.sae_batch),
    )
    SAETrainer(cfg, sae, provider()).fit()
    return time.perf_counter() - t0


def speed(args) -> dict[str, Any]:
    """Tokens/s of both loops, alternating runs; ratio of our cost to theirs (median)."""
    store = ActivationStore(args.acts)
    hook = store.hooks[0]
    train_docs, _ = doc_split(store)
    x = rows_from_store(store, hook, exclude_bos=True, doc_mask=train_docs)
    tokens = args.speed_steps * args.sae_batch
    t_ours, t_theirs = [], []
    for r in range(args.repeats):
        t_theirs.append(theirs(x, args, args.speed_steps))
        t_ours.append(ours(x, args, args.speed_steps))
        log = f"[bench] speed repeat {r}: ours {t_ours[-1]:.1f}s, SAETrainer {t_theirs[-1]:.1f}s"
        print(log, file=sys.stderr, flush=True)
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    return {
        "architecture": "topk", "d_sae": args.sae_width, "k": args.sae_k,
        "batch_size": args.sae_batch, "steps": args.speed_steps, "rows": len(x),
        "ours_tokens_per_s": round(tokens / mo, 1), "saelens_trainer_tokens_per_s": round(tokens / mt, 1),
        "ours_s": [round(t, 2) for t in t_ours], "saelens_trainer_s": [round(t, 2) for t in t_theirs],
        "cost_ratio_ours_over_saelens": round(mo / mt, 3), "target_ratio": 1.2,
        "saelens_entry_point": "sae_lens.SAETrainer.fit (what LanguageModelSAETrainingRunner runs)",
    }  # fmt: skip


def compare(args) -> dict[str, Any]:
    """A minus B for each held-out number both fits hold (or --compare-key), paired over documents."""
    a, b = args.compare
    keys = args.compare_key or comparable_keys(a, b)
    if not keys:
        raise SystemExit(f"{a} and {b} hold no held-out number in common to compare")
    return {
        "a": a,
        "b": b,
        "differences": {k: paired_difference(a, b, k, n_boot=args.n_boot) for k in keys},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("acts", nargs="?", default="runs/harvest/fable_work-all")
    p.add_argument("--n-features", type=int, default=64, help="width of svd/pca/nmf/cca")
    p.add_argument("--sae-width", type=int, default=4608)
    p.add_argument("--sae-k", type=int, default=32)
    p.add_argument("--sae-batch", type=int, default=1024)
    p.add_argument("--sae-lr", type=float, default=1e-3)
    p.add_argument("--sae-tokens", type=int, default=100_000, help="token presentations")
    p.add_argument("--splice", action="store_true", help="load the model: spliced CE recovered")
    p.add_argument("--splice-docs", type=int, default=16)
    p.add_argument("--speed-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--model", default="smollm2", help="for a harvest made here")
    p.add_argument("--hook", default="blocks.15.hook_resid_post", help="for a harvest made here")
    p.add_argument("--docs", type=int, default=None, help="stories in a harvest made here")
    p.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"),
                   help="only compare two fit-basis out_dirs, paired over held-out documents")  # fmt: skip
    p.add_argument("--compare-key", action="append", help="fvu, ce_increase, ce_recovered, "
                   "ce_recovered_vs_mean (repeatable; default: every one both hold)")  # fmt: skip
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for --compare")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.compare:
        print(json.dumps(finite(compare(args)), indent=1, allow_nan=False))  # NaN -> null
        return
    ensure_harvest(args)
    model = None
    if args.splice:
        from analoglock.model import load_model

        model = load_model(ActivationStore(args.acts).meta["model"]["spec"])
    result = {
        "acts": args.acts,
        "hook": ActivationStore(args.acts).hooks[0],
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "note": "timings on a shared CPU are noisy",
    }
    if not args.skip_quality:
        result["bases"] = fit_all(args, model)
    result["sae_training_speed"] = speed(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
