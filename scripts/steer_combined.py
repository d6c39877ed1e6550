"""Does the lock's map add story structure on top of the mean difference? Steer with both at once.

The lock alone keeps the fable (analogue MRR up, judge shift ~0); the mean difference alone moves
the text to the office and loses the story. This sums them (`combined_steering`: the map at
alpha on its positions, then the mean difference at a scale everywhere) and asks whether the sum
sits above the mean difference's own trade-off between domain shift and analogue specificity, on
a split that is not test (validation by default: an exploration, not a claim).

Prints ONE JSON object: `rows` (every arm's point measures: unsteered, the mean difference at
each scale, the lock alone, the sum at each alpha x scale, and the shuffled-pairs map plus the
mean difference as the sum's control), `above_meandiff_curve` per sum (its analogue MRR minus the
mean difference's at the same judge shift, linear between the measured scales and the unsteered
point), and `paired` (each sum against the mean difference at its scale: bootstrap 95% interval
of the difference over prompts, Wilcoxon p).

    .venv/bin/python scripts/steer_combined.py runs/bench_lock_v2/seed0 --n-prompts 30
"""

from __future__ import annotations

import argparse
import json
import logging

import torch


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="a lock run directory (analoglock-train or bench_lock output)")
    p.add_argument("--model", default="smollm2", help="the lock's model: smollm2, gemma3, an HF name or dir")  # fmt: skip
    p.add_argument("--split", default="validation", choices=["validation", "train"],
                   help="never test: this chooses nothing, but it is read as an exploration")  # fmt: skip
    p.add_argument("--n-prompts", type=int, default=30)
    p.add_argument("--alpha", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--map-positions", default="all")
    p.add_argument("--scale", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ref-split", default="train")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-boot", type=int, default=2000)
    return p.parse_args(argv)


def curve_gap(point: dict, curve: list[dict]) -> float:
    """`point`'s analogue MRR minus the curve's at the same judge shift (linear between curve
    points sorted by judge shift; clamped to the ends)."""
    pts = sorted((c["judge_shift"], c["analogue_mrr"]) for c in curve)
    x = point["judge_shift"]
    if x <= pts[0][0]:
        return point["analogue_mrr"] - pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x <= x1:
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return point["analogue_mrr"] - (y0 + t * (y1 - y0))
    return point["analogue_mrr"] - pts[-1][1]


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from analoglock.lock.export import load_artifact
    from analoglock.lock.judge import load_judge
    from analoglock.lock.steering import (
        SteerOptions,
        arm_measures,
        build_task,
        combined_steering,
        map_steering,
        run_arm,
        summarize,
        vector_steering,
    )
    from analoglock.model import load_model

    model = load_model(args.model)
    artifact = load_artifact(args.ckpt, model)
    if "meandiff" not in artifact.vectors:
        raise SystemExit(f"{args.ckpt}: the lock has no 'meandiff' vector to add its map to")
    judge = load_judge()
    opts = SteerOptions(n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens,
                        ref_split=args.ref_split, progress=False)  # fmt: skip
    task = build_task(model, judge, artifact.cfg["dataset"], args.split, opts)
    hook, md, pos = artifact.hook, artifact.vectors["meandiff"], args.map_positions
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=opts.batch_size)

    def lock(mapper, alpha):
        return map_steering(model, mapper, hook, alpha, pos)

    def vec(scale):
        return vector_steering(model, hook, md, scale, "all")

    arms = {"unsteered": None}
    arms |= {f"meandiff_{s:g}": vec(s) for s in args.scale}
    arms |= {f"lock_{a:g}": lock(artifact.mapper, a) for a in args.alpha}
    arms |= {
        f"lock_{a:g}+meandiff_{s:g}": combined_steering(lock(artifact.mapper, a), vec(s))
        for a in args.alpha
        for s in args.scale
    }
    if artifact.control_mapper is not None:
        arms |= {
            f"control_{a:g}+meandiff_{s:g}": combined_steering(
                lock(artifact.control_mapper, a), vec(s)
            )
            for a in args.alpha
            for s in args.scale
        }
    results = {name: run_arm(model, task, s, judge, name, **kw) for name, s in arms.items()}
    base = results["unsteered"]
    rows = [{"arm": name, **arm_measures(r, base)} for name, r in results.items()]
    curve = [r for r in rows if r["arm"] == "unsteered" or r["arm"].startswith("meandiff_")]
    sums = [name for name in results if "+" in name]
    paired = {}
    for name in sums:
        ref = name.split("+")[1]
        # only the two arms (and the base): summarize bootstraps every arm it is given, and its
        # resampling indices are drawn before any arm, so the pair's numbers are the same
        pair = {"unsteered": base, ref: results[ref], name: results[name]}
        out = summarize(pair, reference=ref, compare=[name], n_boot=args.n_boot)
        paired[name] = out["paired"][f"{name}_vs_{ref}"]
    result = {
        "ckpt": args.ckpt,
        "split": args.split,
        "n_prompts": len(task.prompts),
        "hook": hook,
        "map_positions": pos,
        "rows": rows,
        "above_meandiff_curve": {r["arm"]: curve_gap(r, curve) for r in rows if r["arm"] in sums},
        "paired": paired,
        "texts": {name: r.texts[:3] for name, r in results.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
