"""Can the model retell a fable as its workplace analogue when simply asked? Prints one JSON object.

The ceiling reference for the lock's steering: no steering at all, the same test openings
(`lock.steering.build_task`), three ways of prompting, each measured as the steering arms are
(analogue rank of the continuation's judge embedding among the split's workplace stories, judge
score toward the workplace centroid, distinct-2, loops, continuation perplexity):
- unsteered: the opening alone;
- asked: the opening inside the dataset's instruction, in the chat template (the `asked` arm of
  `analoglock-steer`; instruct models only);
- fewshot: `--shots` train pairs written out as "Fable: ... / The same story in an office: ...",
  then the opening (what a base model can be given instead of an instruction).
Paired bootstrap intervals over prompts for each prompt's analogue reciprocal rank against
unsteered. Choose the wording on validation (`--split validation`), then run test once.

    .venv/bin/python scripts/retell_by_prompting.py [--model smollm2] [--split test] [--n 60] [--shots 2]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from analoglock.data import load_pairs
from analoglock.lock.judge import load_judge
from analoglock.lock.steering.hooks import steered_generate
from analoglock.lock.steering.measures import (
    continuation_perplexity,
    cosine_ranks,
    distinct_n,
    domain_scores,
    has_loop,
)
from analoglock.lock.steering.prompts import STORY_PREFIX, asked_prompts, resolve_ask
from analoglock.lock.steering.task import SteerOptions, build_task
from analoglock.model import load_model
from analoglock.stats import bootstrap_mean


def fewshot_prompt(demos, opening: str) -> str:
    """`demos` written out as fable / office pairs, then the opening (its story prefix dropped)."""
    shots = "".join(f"Fable: {d.a}\nThe same story in an office: {d.b}\n\n" for d in demos)
    if opening.startswith(STORY_PREFIX):
        rest = opening[len(STORY_PREFIX) :]
        opening = rest[:1].upper() + rest[1:]
    return shots + f"Fable: {opening}\nThe same story in an office:"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="fable_work")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=60, help="openings (the first n pairs of the split)")
    ap.add_argument("--shots", type=int, default=2, help="train pairs shown in the few-shot prompt")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument(
        "--ref-split", default="train", help="split whose stories give the judge centroids"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--show", type=int, default=4, help="prompts whose texts are printed to stderr")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    judge = load_judge()
    task = build_task(
        model,
        judge,
        args.dataset,
        args.split,
        SteerOptions(n_prompts=args.n, ref_split=args.ref_split),
    )
    openings = [p.text for p in task.prompts]
    arms = {"unsteered": openings}
    ask = resolve_ask("auto", args.dataset, model)
    if ask is not None:
        arms["asked"] = [p.text for p in asked_prompts(model, task.prompts, ask)]
    demos = load_pairs(args.dataset, "train")[: args.shots]
    arms["fewshot"] = [fewshot_prompt(demos, t) for t in openings]
    own = [p.index for p in task.prompts]
    out = {"model": args.model, "dataset": args.dataset, "split": args.split, "n_prompts": len(openings),
           "n_candidates": len(task.candidates), "chance_top1": 1 / len(task.candidates),
           "shots": args.shots, "instruction": ask, "max_new_tokens": args.max_new_tokens}  # fmt: skip
    texts, rr = {}, {}
    for arm, prompts in arms.items():
        gen = steered_generate(model, prompts, None, None, args.max_new_tokens, 16)
        emb = judge.embed(gen.completions)
        rank = cosine_ranks(emb, task.candidates, own)
        rr[arm], texts[arm] = 1.0 / rank, gen.completions
        judge_score = domain_scores(emb, task.a_centroid, task.b_centroid)
        out[arm] = {
            "analogue_top1": float((rank == 1).float().mean()),
            "analogue_mrr": float(rr[arm].mean()),
            "judge_score": float(judge_score.mean()),
            "distinct2": float(distinct_n(gen.new_tokens).nanmean()),
            "loop_rate": float(has_loop(gen.new_tokens).mean()),
            "ppl": float(continuation_perplexity(model, gen.new_tokens, 16).nanmean()),
        }
    for arm in arms:
        if arm != "unsteered":
            out[arm]["judge_shift"] = out[arm]["judge_score"] - out["unsteered"]["judge_score"]
            mean, lo, hi = bootstrap_mean(rr[arm] - rr["unsteered"])
            out[arm]["analogue_mrr_minus_unsteered"] = [mean, lo, hi]
    for i, p in enumerate(task.prompts[: args.show]):
        print(f"---- {p.id}\nprompt: {p.text}", file=sys.stderr)
        for arm in arms:
            print(f"{arm}: {texts[arm][i]}", file=sys.stderr)
        print(f"analogue: {p.analogue}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
