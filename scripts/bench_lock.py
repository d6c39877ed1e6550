"""Benchmark the analogy lock end to end: choose on validation, train seeds, steer the test split.

1. select: for every hook in --layers and every map in --maps, train the lock on fable_work
   (story, role and mention pairs) for --epochs epochs and read its VALIDATION role MRR and story
   top-1 each epoch (the closed-form baselines are scored on the same rows). The best (hook, map,
   epoch budget) by validation role MRR is kept. The test split is never read here.
2. seeds: train the chosen configuration with --seeds seeds (each with its shuffled-pairs control).
3. steer: each seed's artifact steers the test split's fable openings (lock map, mean difference,
   shuffled-pairs map, random directions from the activations' covariance; alpha, positions and
   the mean difference's scale chosen on the validation split), see analoglock.lock.steering.
Prints ONE JSON object (keys in the lock issue: n_seeds, analogue_top1, meandiff_analogue_top1,
unsteered_analogue_top1, role_mrr, meandiff_role_mrr, unsteered_role_mrr, judge_shift,
meandiff_judge_shift, fluency_ratio, diversity_ratio, with intervals) and writes it, the selection
table and a report under --out.

    .venv/bin/python scripts/bench_lock.py [--layers 12 16 20 24] [--seeds 3] [--model HF_DIR]

tests/unit/test_benchmarks.py runs every stage on a tiny random model, to keep this script alive.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

MAPS = {
    "translation": ["mapper=translation"],
    "lowrank8": ["mapper=lowrank", "mapper.rank=8"],
    "lowrank32": ["mapper=lowrank", "mapper.rank=32"],
    "affine_ridge": ["mapper=affine", "+loss.weights.fro=0.01"],
    "orthogonal": ["mapper=orthogonal"],
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[12, 16, 20, 24])
    p.add_argument("--layer-sets", nargs="*", default=[], metavar="L1,L2",
                   help="also several layers at once (e.g. 16,20 16,20,24): each row is the "
                        "layers' residuals side by side, each scaled to unit RMS on train "
                        "(paired.concat_hooks); scored on validation beside single layers, never "
                        "chosen (a map steers at one hook)")  # fmt: skip
    p.add_argument("--maps", nargs="+", default=list(MAPS), choices=list(MAPS))
    p.add_argument("--epochs", type=int, default=8, help="epoch budget per selection run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-random", type=int, default=20, help="covariance-drawn random directions")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--out", default="runs/bench_lock")
    p.add_argument("--model", default=None,
                   help="an embedded model's config name (smollm2, gemma3) or an HF name/dir "
                        "(default: the embedded SmolLM2)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-prompts", type=int, default=None, help="first n pairs of each split")
    p.add_argument("--alpha", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--map-positions", nargs="+", default=["roles", "all"])
    p.add_argument("--scale", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--ref-split", default="train",
                   help="split whose stories give the judge's domain centroids (never test)")  # fmt: skip
    p.add_argument("--no-steer", action="store_true",
                   help="stop after the seeds' held-out retrieval (skip stage 3, the slow one)")  # fmt: skip
    p.add_argument("--selected", default=None,
                   help="a selection.json from an earlier run: skip stage 1 and use its best")  # fmt: skip
    return p.parse_args(argv)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from analoglock.cli._conf import CONF_MODULE

    with initialize_config_module(config_module=CONF_MODULE, version_base=None):
        return hydra_compose("train", overrides=overrides)


def model_overrides(args) -> list[str]:
    """Hydra overrides for --model: a config of the model group by name, else an HF spec."""
    if not args.model:
        return []
    from importlib.resources import files

    named = "/" not in args.model and files("analoglock.conf").joinpath(
        "model", f"{args.model}.yaml"
    )
    if named and named.is_file():
        return [f"model={args.model}"]
    return ["model=hf", f"model.spec={args.model}"]


def select(args, base: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Validation-only sweep; returns (table, best row)."""
    import hydra

    from analoglock.lock.train import fit
    from analoglock.paired import concat_hooks, paired_activations

    def hook_of(layer: int | str) -> str:
        return f"blocks.{layer}.hook_resid_post"

    hooks = [hook_of(layer) for layer in args.layers]
    # several layers at once, by name: "blocks.16+20.hook_resid_post" -> [16, 20]
    layer_sets = [[int(x) for x in s.split(",")] for s in args.layer_sets]
    sets = {hook_of("+".join(map(str, ls))): ls for ls in layer_sets}
    needed = sorted({*hooks, *(hook_of(layer) for ls in sets.values() for layer in ls)})
    cfg0 = compose([*base, f"hook={hooks[0]}", "run_name=select", "out_dir=unused"])
    model = hydra.utils.instantiate(cfg0.model)
    pairs = {
        h: paired_activations(model, cfg0.data.name, h, tuple(cfg0.views), also=needed)
        for h in needed
    }
    del model
    for name, ls in sets.items():
        pairs[name] = concat_hooks([pairs[hook_of(layer)] for layer in ls])
    table = []
    for hook in [*hooks, *sets]:
        paired = pairs[hook]
        train_part = paired.subset("train")
        center = torch.cat([train_part.a, train_part.b]).mean(0)
        for name in args.maps:
            cfg = compose([*base, *MAPS[name], f"hook={hook.replace('+', '_')}",
                           "run_name=select", "out_dir=unused", "shuffled_control=false"])  # fmt: skip
            t0 = time.perf_counter()
            module, cb, _ = fit(cfg, paired, center, None, None, max_epochs=args.epochs)
            hist = cb.history
            best = max(hist, key=lambda h: h["mrr_roles"])
            base_val = {
                b: {k: float(v.mean()) for k, v in {
                    "top1_roles": module.val_baselines[b]["roles"]["hit"],
                    "mrr_roles": module.val_baselines[b]["roles"]["rr"],
                    "top1_story": module.val_baselines[b]["story"]["hit"],
                    "top1_assign": module.val_baselines[b]["assign"]["hit"]}.items()}
                for b in module.val_baselines
            }  # fmt: skip
            row = {
                "hook": hook, "map": name, "best_epoch": best["epoch"],
                "val_mrr_roles": best["mrr_roles"], "val_top1_roles": best["top1_roles"],
                "val_top1_story": best["top1_story"],
                "val_top1_assign": best.get("top1_assign"),
                "val_margin_roles_vs_meandiff": best["margins"].get("top1_roles_vs_meandiff"),
                "locked_any_epoch": any(h["locked"] for h in hist),
                "steerable": "+" not in hook,  # several layers at once: representation only
                "baselines": base_val, "seconds": round(time.perf_counter() - t0, 1),
            }  # fmt: skip
            logging.info("select %s", json.dumps(row))
            table.append(row)
    steerable = [r for r in table if r["steerable"]]
    best = max(steerable, key=lambda r: (r["val_mrr_roles"], r["val_top1_story"]))
    return table, best


def main(argv=None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = [*model_overrides(args), "logger=csv", "trainer.enable_progress_bar=false"]
    if args.selected:
        chosen = json.loads(Path(args.selected).read_text())
        table, best = chosen["table"], chosen["best"]
    else:
        table, best = select(args, base)
    (out / "selection.json").write_text(json.dumps({"table": table, "best": best}, indent=1))

    from analoglock.lock.train import train

    runs = []
    for seed in range(args.seeds):
        run_dir = out / f"seed{seed}"
        cfg = compose([*base, *MAPS[best["map"]], f"hook={best['hook']}", f"seed={seed}",
                       f"trainer.max_epochs={best['best_epoch'] + 1}", "run_name=bench",
                       f"out_dir={run_dir}"])  # fmt: skip
        metrics, _ = train(cfg)
        runs.append({"seed": seed, "dir": str(run_dir), "locked": metrics["locked"],
                     "test": metrics["test"], "test_margins": metrics["test_margins"]})  # fmt: skip

    result = {
        "selected": {k: best[k] for k in ("hook", "map", "best_epoch", "val_mrr_roles")},
        "n_seeds": len(runs),
        "locked": [r["locked"] for r in runs],
        "test_role_retrieval": {r["seed"]: r["test"] for r in runs},
        "test_margins": {r["seed"]: r["test_margins"] for r in runs},
    }
    if args.no_steer:
        (out / "bench_lock.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return result

    from analoglock.lock.steering.bench import steer_seeds

    steering = steer_seeds(
        [r["dir"] for r in runs],
        model_overrides=model_overrides(args),
        n_random=args.n_random,
        max_new_tokens=args.max_new_tokens,
        n_prompts=args.n_prompts,
        alphas=args.alpha,
        positions=args.map_positions,
        scales=args.scale,
        ref_split=args.ref_split,
    )
    result.update(steering)
    (out / "bench_lock.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
