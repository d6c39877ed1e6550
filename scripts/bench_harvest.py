"""Benchmark the harvester against TransformerLens's naive run_with_cache; prints one JSON object.

Fixed batch: 16 rows x 128 tokens of shipped fable/workplace text; one middle-layer hook
(blocks.15.hook_resid_post of SmolLM2's 30). The roofline is the float32 matmul throughput
measured here, and the harvester is credited only with the FLOPs it must do (layers up to the hook).

    python scripts/bench_harvest.py [--model smollm2] [--hook blocks.15.hook_resid_post] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from analoglock.activations import harvest, tokenize_documents
from analoglock.data import Document, load_documents
from analoglock.hooks import hook_layer
from analoglock.model import load_model, model_info
from analoglock.positions import AllTokens


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s (best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(cfg, n_layers: int, ctx: int, unembed: bool) -> float:
    """Forward FLOPs per token for `n_layers` Llama blocks at mean causal context ctx/2."""
    d, d_mlp, d_head = cfg.d_model, cfg.d_mlp, cfg.d_head
    n_heads, n_kv = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads
    proj = 2 * d * (n_heads * d_head) * 2 + 2 * d * (n_kv * d_head) * 2  # q, o and k, v
    attn = 2 * 2 * n_heads * d_head * (ctx / 2)  # scores and weighted sum over the causal prefix
    mlp = 2 * d * d_mlp * (3 if cfg.gated_mlp else 2)
    total = n_layers * (proj + attn + mlp)
    return total + (2 * d * cfg.d_vocab if unembed else 0)


def fixed_batch(model, rows: int, ctx: int) -> list[Document]:
    """`rows` documents of at least `ctx` tokens each from shipped stories (truncated to ctx)."""
    stories = [d.text for d in load_documents("fable_work")]
    docs, current = [], ""
    for text in stories:
        current = f"{current} {text}".strip()
        if len(tokenize_documents(model, [Document("x", current)])[0].ids) >= ctx:
            docs.append(Document(f"bench/{len(docs)}", current))
            current = ""
            if len(docs) == rows:
                return docs
    raise RuntimeError("not enough text for the benchmark batch")


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--hook", default="blocks.15.hook_resid_post")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    peak = matmul_flops()
    model = load_model(args.model)
    docs = fixed_batch(model, args.rows, args.ctx)
    tokens = torch.stack([torch.tensor(t.ids) for t in tokenize_documents(model, docs, args.ctx)])
    n_tok = tokens.numel()

    def ours():
        harvest(
            model,
            docs,
            [args.hook],
            AllTokens(include_bos=True),
            batch_tokens=n_tok,
            max_length=args.ctx,
            progress=False,
        )

    def naive():
        with torch.no_grad():
            model.run_with_cache(tokens)

    def hf_forward():
        with torch.no_grad():
            model.original_model(tokens)

    t_ours = timed(ours, args.repeats)
    t_naive = timed(naive, max(1, args.repeats - 1))
    t_hf = timed(hf_forward, args.repeats)
    cfg = model.cfg
    layers_run = hook_layer(args.hook) + 1
    f_ours = flops_per_token(cfg, layers_run, args.ctx, unembed=False)
    f_full = flops_per_token(cfg, cfg.n_layers, args.ctx, unembed=True)
    result = {
        "model": model_info(model).spec,
        "hook": args.hook,
        "batch": [args.rows, args.ctx],
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "tokens_per_s": round(n_tok / t_ours, 1),
        "naive_tokens_per_s": round(n_tok / t_naive, 1),
        "speedup_vs_naive": round(t_naive / t_ours, 2),
        "hf_full_forward_tokens_per_s": round(n_tok / t_hf, 1),
        "matmul_gflops": round(peak / 1e9, 1),
        "harvest_gflop_per_token": round(f_ours / 1e9, 4),
        "full_forward_gflop_per_token": round(f_full / 1e9, 4),
        "roofline_fraction": round(f_ours * n_tok / t_ours / peak, 3),
        "hf_full_forward_roofline_fraction": round(f_full * n_tok / t_hf / peak, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
