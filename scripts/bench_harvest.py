"""Benchmark the harvester against what a TransformerLens user would write; prints one JSON object.

Baselines, on the same tokens:
- `run_with_cache(tokens, names_filter=hook, stop_at_layer=L + 1)`: the filtered cache that stops
  after the hook's block (what a TransformerLens user writes; None for the last layer's hook);
- `run_with_cache(tokens)`: the naive full cache, kept for comparison with older numbers;
- a plain Hugging Face forward (all layers and the unembedding): the speed the hardware gives a
  forward, against which every path is compared per FLOP.
Each path is credited only with the FLOPs it must do (blocks up to the hook; the HF forward with
the unembedding), so `flop_efficiency_vs_hf` > 1 means more useful FLOP/s than a plain forward.

Two workloads, each at a middle hook and the last layer's hook:
- fixed: `--rows` x `--ctx` tokens of shipped fable/workplace text (every row full: no padding);
- ragged: the shipped fable_work stories as they are (30-150 tokens): the harvester buckets them
  by length and copies out only real tokens; the baselines pad batches of `--ragged-batch`
  stories in dataset order (as a user passing a list of texts would) and drop the pads after.

    python scripts/bench_harvest.py [--model smollm2] [--hooks blocks.15.hook_resid_post last] [--repeats 3]
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
from analoglock.tokens import pad_ids


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


def flops_per_token(cfg, n_layers: int, ctx: float, unembed: bool) -> float:
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


def resolve_hook(model, hook: str) -> str:
    """`last` is the last block's resid_post."""
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post" if hook == "last" else hook


def padded_batches(model, docs, ctx: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) of consecutive `batch` documents, right-padded to each batch's longest."""
    toks = [t.ids for t in tokenize_documents(model, docs, ctx)]
    pad = model.tokenizer.pad_token_id
    return [pad_ids(toks[s : s + batch], pad) for s in range(0, len(toks), batch)]


def measure(model, docs, hook: str, ctx: int, batch: int, batch_tokens: int, repeats: int, peak: float) -> dict:  # fmt: skip
    """Tokens/s and FLOP efficiency of our harvest and the three baselines on one workload."""
    cfg = model.cfg
    layer = hook_layer(hook)
    stop = layer + 1 if layer + 1 < cfg.n_layers else None
    batches = padded_batches(model, docs, ctx, batch)
    n_real = sum(int(m.sum()) for _, m in batches)
    n_padded = sum(m.numel() for _, m in batches)
    mean_len = n_real / len(docs)

    def ours():
        harvest(model, docs, [hook], AllTokens(include_bos=True), batch_tokens=batch_tokens, max_length=ctx, progress=False)  # fmt: skip

    @torch.no_grad()
    def tl_filtered():
        for ids, mask in batches:
            _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=hook, stop_at_layer=stop)  # fmt: skip
            cache[hook][mask.bool()].clone()  # the real rows, as the harvester keeps them

    @torch.no_grad()
    def tl_full():
        for ids, mask in batches:
            model.run_with_cache(ids, attention_mask=mask)

    @torch.no_grad()
    def hf_forward():
        for ids, mask in batches:
            model.original_model(input_ids=ids, attention_mask=mask)

    secs = {
        "harvester": timed(ours, repeats),
        "run_with_cache_filtered_stop": timed(tl_filtered, repeats),
        "run_with_cache_full": timed(tl_full, max(1, repeats - 1)),
        "hf_forward": timed(hf_forward, repeats),
    }
    f_hook = flops_per_token(cfg, layer + 1, mean_len, unembed=False)
    f_full = flops_per_token(cfg, cfg.n_layers, mean_len, unembed=True)
    credit = {"harvester": f_hook, "run_with_cache_filtered_stop": f_hook,
              "run_with_cache_full": f_full, "hf_forward": f_full}  # fmt: skip
    tps = {k: n_real / s for k, s in secs.items()}
    useful = {k: tps[k] * credit[k] for k in secs}  # useful FLOP/s
    return {
        "hook": hook,
        "n_docs": len(docs),
        "real_tokens": n_real,
        "padding_fraction_of_baselines": round(1 - n_real / n_padded, 3),
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "speedup_vs_run_with_cache_filtered_stop": round(
            secs["run_with_cache_filtered_stop"] / secs["harvester"], 2
        ),  # fmt: skip
        "speedup_vs_run_with_cache_full": round(secs["run_with_cache_full"] / secs["harvester"], 2),
        "gflop_per_token": {
            "to_hook": round(f_hook / 1e9, 4),
            "full_forward": round(f_full / 1e9, 4),
        },  # fmt: skip
        "flop_efficiency_vs_hf": {k: round(useful[k] / useful["hf_forward"], 3) for k in secs},
        "roofline_fraction": {k: round(useful[k] / peak, 3) for k in secs},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--hooks", nargs="+", default=["blocks.15.hook_resid_post", "last"])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--ragged-docs", type=int, default=300, help="shipped stories (0 skips)")
    ap.add_argument("--ragged-batch", type=int, default=16, help="stories per baseline batch")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="the harvester's bucket size")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    peak = matmul_flops()
    model = load_model(args.model)
    hooks = [resolve_hook(model, h) for h in args.hooks]
    fixed = fixed_batch(model, args.rows, args.ctx)
    ragged = load_documents("fable_work")[: args.ragged_docs]
    result = {
        "model": model_info(model).spec,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "matmul_gflops": round(peak / 1e9, 1),
        "fixed": {"batch": [args.rows, args.ctx], "by_hook": {}},
        "ragged": {"ctx": 512, "baseline_batch": args.ragged_batch, "by_hook": {}},
    }
    for hook in hooks:
        n_tok = args.rows * args.ctx
        result["fixed"]["by_hook"][hook] = measure(model, fixed, hook, args.ctx, args.rows, n_tok, args.repeats, peak)  # fmt: skip
        if ragged:
            result["ragged"]["by_hook"][hook] = measure(model, ragged, hook, 512, args.ragged_batch, args.batch_tokens, args.repeats, peak)  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
