"""Benchmark batched decoding against the machine's limit for it.

Prints ONE JSON object:
- `tokens_per_s`: new tokens per second of `analoglock.generation.generate` as the corpus calls
  it: `hook_points=False` (`generation.decode`'s loop over the Hugging Face modules the bridge
  wraps: SDPA attention, a preallocated `PrefixKVCache`, the prompt prefilled 16 rows at a time
  by length, skipping the padding they share),
  a progress tick per step, `nucleus_sample`; whole call (prefill + decoding steps).
  `decode_tokens_per_s`: the decoding steps alone.
- `bridge_tokens_per_s`: the same call through the bridge (hook points live, one no-op hook on
  `hook_embed`, `ExpandedKVCache`): what decoding with hooks (steering) pays; the corpus's path
  before 2026-11-30.
- `hooked_tokens_per_s` (`--paths hooked`): steering's path since 2026-11-30: one no-op hook at
  the middle layer's `hook_resid_post`, attached to the HF decoder layer (`generation.hf_hooks`),
  decoded by `decode` with the prompt prefilled in one pass (hooks expect it whole).
- `default_cache_tokens_per_s`: the bridge with transformers' default cache (the path before
  `ExpandedKVCache`).
- `hf_sampling_tokens_per_s` (sample mode): the bridge sampling with transformers' own warpers
  (`hf_sampling=True`: a full-vocabulary sort and softmax draw per step) instead of
  `sampling.nucleus_sample` (the same distribution, other draws).
- `hf_tokens_per_s`: plain Hugging Face `generate` on an unwrapped copy of the model (eager
  attention, default cache), same ids, same settings.
- `roofline_tokens_per_s`: the fastest this machine could produce the same tokens with these
  operations, from the measured matmul FLOP/s (`peak_gflop_s`, float32 2048^3) and memory read
  bandwidth (`bandwidth_gb_s`): the prefill, then each step at its context length, each group of
  operations at its own bound (linear layers and the tied unembedding: FLOPs / peak vs their
  float32 weights / bandwidth; attention: FLOPs vs reading the compact KV cache once),
  summed. Only each row's own tokens count, not its left padding: the prompts are 59 tokens at
  the mean and padded to 66, and padding is not work the tokens need. The prefill unembeds only
  each row's last position (what decides the first new token). Sampling (top-p sort,
  multinomial) and Python are left out: they are not the model.
  `roofline_fraction` = tokens_per_s / roofline_tokens_per_s.
  Two corrections on 2026-11-30: the roofline used to unembed every prompt position in the
  prefill (~10% too low, fractions ~0.06 too high), and then it counted every row at the padded
  width (~5% too low, fractions ~0.03 too high at the defaults: 776.5 against 818.4 tokens/s).
  `padded_roofline_tokens_per_s` is the roofline between the two corrections (every row at the
  padded width), to compare with earlier records.
- `same_greedy_tokens_as_hf` (greedy mode): our tokens equal plain HF's;
  `same_tokens_as_hooked`, `same_tokens_as_bridge`, `same_tokens_as_default_cache`: neither a
  whole prefill, the HF modules nor the cache change a token (sampled too, same seed).
- `--paths` runs a subset (`fast` always); keys of the paths left out are absent.
- `batch_size`, `new_tokens`, `prompt_tokens` (padded width), `prompt_tokens_mean` (unpadded),
  `n_runs` (paths interleaved per run; medians), `load_average` (1-minute at start and end: the
  machine may be shared).

Prompts are the corpus's story requests in the chat template (`analoglock.corpus`), made here.
Mode `sample` uses the corpus settings (temperature 0.8, top-p 0.95, repetition penalty 1.1).

    .venv/bin/python scripts/bench_decode.py [--batch-size 128] [--new-tokens 64] [--mode sample]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

PATHS = ("fast", "hooked", "bridge", "default", "hf", "hf_sampling")
CORPUS_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch-size", type=int, default=128, help="the corpus batch (steering: 16)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--mode", choices=["sample", "greedy"], default="sample")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                   help="which paths to time (fast is always timed)")  # fmt: skip
    p.add_argument("--profile-steps", type=int, default=0,
                   help="also profile this many decoding steps of the fast path (torch.profiler): "
                        "`profile_ms_per_step`, the operators' self time per step")  # fmt: skip
    return p.parse_args()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_gflop_s(n: int = 2048, repeats: int = 5) -> float:
    """Best-of float32 n^3 matmul rate (what the linear layers can reach at best)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def read_gb_s(mib: int = 512, repeats: int = 5) -> float:
    """Best-of read bandwidth: a sum over, and a matrix-vector product with, a large tensor."""
    x = torch.randn(mib * 2**20 // 4)
    w = x[: (x.numel() // 4096) * 4096].view(-1, 4096)
    v = torch.randn(4096)
    best_sum = min(_time(x.sum) for _ in range(repeats))
    best_mv = min(_time(lambda: w @ v) for _ in range(repeats))
    return max(x.numel() * 4 / best_sum, w.numel() * 4 / best_mv) / 1e9


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def model_shape(hf) -> dict[str, int]:
    """Parameter counts and attention shape of a decoder-only HF model."""
    cfg = hf.config
    emb = hf.get_input_embeddings().weight
    linear = sum(
        m.weight.numel()
        for name, m in hf.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    )
    return {
        "linear_params": linear,  # every projection of every block
        "unembed_params": hf.get_output_embeddings().weight.numel(),  # tied: the embedding
        "embed_dim": emb.shape[1],
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        "d_head": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
    }


def roofline_seconds(shape: dict, lengths: list[int], new: int, peak: float, bw: float):
    """(prefill seconds, decoding seconds) at the machine's limit for prompts of these token
    counts (padding excluded); see the module docstring."""
    batch, prompt = len(lengths), sum(lengths)
    w_bytes = 4 * (shape["linear_params"] + shape["unembed_params"])
    w_flops = 2 * (shape["linear_params"] + shape["unembed_params"])  # per token
    # the prefill unembeds only each row's last position: that alone decides the first new token
    prefill_flops = 2 * shape["linear_params"] * prompt + 2 * shape["unembed_params"] * batch
    heads, kv, dh, layers = (
        shape["n_heads"],
        shape["n_kv_heads"],
        shape["d_head"],
        shape["n_layers"],
    )

    def attention(pairs: float, ctx: int) -> float:
        """`pairs` query-key products, reading `ctx` cached positions (all rows summed)."""
        flops = 4 * layers * heads * dh * pairs  # scores and weighted values
        kv_bytes = 4 * 2 * layers * kv * dh * ctx  # the compact cache, read once
        return max(flops / peak, kv_bytes / bw)

    prefill = max(prefill_flops / peak, w_bytes / bw)
    prefill += attention(sum(n * n / 2 for n in lengths), prompt)  # causal: half the square
    decode = 0.0
    for step in range(1, new):  # the first new token comes out of the prefill
        ctx = prompt + batch * step
        decode += max(batch * w_flops / peak, w_bytes / bw) + attention(ctx, ctx)
    return prefill, decode


def profile_steps(model, prompts, args, settings, top: int = 12) -> dict[str, float]:
    """Self CPU time per decoding step of the `top` costliest operators over --profile-steps
    steps of the fast path (after the prefill and one step, so warm)."""
    from torch.profiler import ProfilerActivity, profile

    from analoglock.generation import generate

    n, seen = args.profile_steps, []
    prof = profile(activities=[ProfilerActivity.CPU])

    def on_step():  # after each forward's logits: the prefill's, then one per step
        seen.append(None)
        if len(seen) == 2:
            prof.start()
        elif len(seen) == 2 + n:
            prof.stop()

    generate(model, prompts, max_new_tokens=n + 3, seed=args.seed, batch_size=args.batch_size,
             hook_points=False, on_step=on_step, **settings)  # fmt: skip
    if len(seen) < 2 + n:
        prof.stop()  # every row ended early
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {e.key: round(e.self_cpu_time_total / 1000 / n, 2) for e in ops}


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from analoglock.corpus import batch_requests
    from analoglock.generation import chat_prompt, encode_prompts, generate
    from analoglock.model import load_dequantized, load_hf, load_model, resolve_spec

    load0 = os.getloadavg()[0]
    model = load_model(args.model)
    source, location, _ = resolve_spec(args.model)
    if source in ("embedded", "gguf"):  # the same cached file, mapped again: no second copy
        plain = load_dequantized(Path(model.original_model.config.name_or_path))
    else:
        plain = load_hf(args.model)[0].eval()
    prompts = [chat_prompt(model, r) for r in batch_requests(args.seed, 0, args.batch_size)]
    ids, mask = encode_prompts(model, prompts)
    tok = model.tokenizer
    sample = args.mode == "sample"
    settings = {"do_sample": True, **CORPUS_SAMPLING} if sample else {"do_sample": False}
    steps: list[float] = []

    def tick() -> None:
        steps.append(time.perf_counter())

    def on_embed(x, hook):  # a progress hook on the bridge: reads nothing, changes nothing
        tick()
        return x

    resid = f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"

    def ours(fast: bool = True, hf_sampling: bool = False, hook_points: bool = True,
             hooked: bool = False):  # fmt: skip
        """(wall s, decoding-steps s, new tokens, positions generated) of one generate call."""
        steps.clear()
        if hooked:  # steering's way: a residual-stream hook on the HF modules, in decode
            kw, first = {"fwd_hooks": [(resid, on_embed)], "hook_points": False}, 1
        elif hook_points:  # the hook fires at the start of each forward: decoding from the 2nd
            kw, first = {"fwd_hooks": [("hook_embed", on_embed)]}, 1
        else:  # the tick comes after each forward's logits: decoding from the 1st
            kw, first = {"hook_points": False, "on_step": tick}, 0
        t = time.perf_counter()
        out = generate(model, prompts, max_new_tokens=args.new_tokens, seed=args.seed,
                       batch_size=args.batch_size, fast_cache=fast, hf_sampling=hf_sampling,
                       **kw, **settings)  # fmt: skip
        end = time.perf_counter()
        decode = end - steps[first] if len(steps) > first else float("nan")
        return end - t, decode, out.new_tokens, len(steps)  # one call per new position

    def hf_plain() -> tuple[float, float, list[list[int]], int]:
        hf_settings = dict(settings)
        if not sample:
            hf_settings.update(temperature=None, top_p=None, top_k=None)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(args.seed)
            t = time.perf_counter()
            out = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 **hf_settings)  # fmt: skip
            wall = time.perf_counter() - t
        rows = []
        for row in out[:, ids.shape[1] :].tolist():
            rows.append(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
        return wall, float("nan"), rows, out.shape[1] - ids.shape[1]

    every = {
        "fast": lambda: ours(hook_points=False),
        "hooked": lambda: ours(hooked=True),
        "bridge": lambda: ours(),
        "default": lambda: ours(fast=False),
        "hf": hf_plain,
        "hf_sampling": lambda: ours(hf_sampling=True),
    }
    wanted = {"fast", *args.paths} - (set() if sample else {"hf_sampling"})
    paths = {name: path for name, path in every.items() if name in wanted}
    for warm in paths.values():  # first calls pay extra
        n_tokens, args.new_tokens = args.new_tokens, 2
        warm()
        args.new_tokens = n_tokens
    peaks, bws = [], []
    runs: dict[str, list] = {name: [] for name in paths}
    for _ in range(args.runs):  # interleaved, so a change in the machine's load hits every path
        peaks.append(matmul_gflop_s())
        bws.append(read_gb_s())
        for name, path in paths.items():
            runs[name].append(path())
    peaks.append(matmul_gflop_s())
    bws.append(read_gb_s())

    # generate stops when every row has ended; until then each row is computed (EOS or not),
    # so tokens = rows x positions generated, the same count for every path and the roofline
    n_steps = runs["fast"][0][3]
    if any(r[3] != n_steps for v in runs.values() for r in v):
        raise RuntimeError(f"paths generated different lengths: {[r[3] for v in runs.values() for r in v]}")  # fmt: skip
    n_useful = sum(len(r) for r in runs["fast"][0][2])  # before each row's EOS
    shape = model_shape(plain)
    peak, bw = median(peaks) * 1e9, median(bws) * 1e9
    lengths = mask.sum(1).tolist()
    prefill_s, decode_s = roofline_seconds(shape, lengths, n_steps, peak, bw)
    # the roofline before 2026-11-30 (evening) counted every row at the padded width
    padded = sum(roofline_seconds(shape, [ids.shape[1]] * len(lengths), n_steps, peak, bw))
    full_steps = len(prompts) * n_steps
    decode_tokens = len(prompts) * (n_steps - 1)
    roofline = full_steps / (prefill_s + decode_s)
    wall = {k: median([r[0] for r in v]) for k, v in runs.items()}
    tokens_per_s = full_steps / wall["fast"]
    out = {
        "model": args.model,
        "mode": args.mode,
        "tokens_per_s": round(tokens_per_s, 2),
        "decode_tokens_per_s": round(decode_tokens / median([r[1] for r in runs["fast"]]), 2),
        "roofline_tokens_per_s": round(roofline, 2),
        "roofline_fraction": round(tokens_per_s / roofline, 3),
        "roofline_decode_tokens_per_s": round(decode_tokens / decode_s, 2) if decode_s else None,
        "padded_roofline_tokens_per_s": round(full_steps / padded, 2),
    }
    named = {
        "hooked": "hooked",
        "bridge": "bridge",
        "default": "default_cache",
        "hf": "hf",
        "hf_sampling": "hf_sampling",
    }
    for path, key in named.items():
        if path in runs:
            out[f"{key}_tokens_per_s"] = round(full_steps / wall[path], 2)
            out[f"speedup_vs_{key}"] = round(wall[path] / wall["fast"], 3)
    for path in ("hooked", "bridge", "default"):
        if path in runs:
            out[f"{named[path]}_decode_tokens_per_s"] = round(
                decode_tokens / median([r[1] for r in runs[path]]), 2
            )
            out[f"same_tokens_as_{named[path]}"] = all(
                f[2] == d[2] for f, d in zip(runs["fast"], runs[path], strict=True)
            )
    out |= {
        "peak_gflop_s": round(median(peaks), 1),
        "bandwidth_gb_s": round(median(bws), 2),
        "batch_size": len(prompts),
        "new_tokens": n_steps,  # positions generated per row (max_new_tokens unless all ended)
        "max_new_tokens": args.new_tokens,
        "new_tokens_before_eos": n_useful,
        "prompt_tokens": ids.shape[1],
        "prompt_tokens_mean": round(sum(lengths) / len(lengths), 2),  # padding excluded
        "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "n_runs": args.runs,
        "torch_threads": torch.get_num_threads(),
        "load_average": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
    }
    if not sample and "hf" in runs:
        out["same_greedy_tokens_as_hf"] = all(
            f[2] == h[2] for f, h in zip(runs["fast"], runs["hf"], strict=True)
        )
    if args.profile_steps:
        out["profile_ms_per_step"] = profile_steps(model, prompts, args, settings)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
