"""Time the kernels a decoding step is made of, alone, at SmolLM2's shapes; prints one JSON object.

Two questions from issue 16, answered by measurement rather than assumed:
- `linear_ms`: would lower-precision weights make the linear layers faster here? The same
  `--layers` distinct [d_mlp, d_model] weights (so they do not stay in cache, as in a forward)
  applied to a [batch, d_model] input: float32 `F.linear`, bfloat16 `F.linear`, and int8
  weight-only `torch._weight_int8pack_mm` (per-row scales), at each `--batch`; plus the int8
  path's relative error. On CPUs without bfloat16/int8 matrix instructions both are slower.
- `sampling_ms`: what one sampled decoding step's token choice costs over the vocabulary at the
  corpus settings (temperature 0.8, top-p 0.95, repetition penalty 1.1): transformers' warpers
  then a softmax draw (`hf_sampling=True` in `analoglock.generation.generate`) against
  `analoglock.sampling.nucleus_sample` (the default), on logits with a language model's spread.
Best of `--repeats` after one warm-up, `--threads` torch threads.

    .venv/bin/python scripts/bench_kernels.py [--threads 2] [--batch 16 128]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 128])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--d-mlp", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default=None,
                   help="also time the samplers on this model's own logits while it writes corpus "
                        "stories (e.g. smollm2): `sampling_ms_model`")  # fmt: skip
    p.add_argument("--model-steps", type=int, default=16, help="decoding steps to collect")
    return p.parse_args()


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return round(best * 1000, 2)


def lm_like_logits(batch: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Logits ranked like a language model's next-token distribution: log-probability falling as
    -s log(rank) (Zipf, s drawn per row in [1.1, 1.8]) plus noise, in a random token order. At
    temperature 0.8 and top-p 0.95 their nuclei hold ~30 tokens at the median and ~700 at the
    99th percentile: wider than SmolLM2's while it writes corpus stories (9 and ~295 with
    --model smollm2), so this errs against the nucleus sampler."""
    log_rank = torch.arange(1, vocab + 1, dtype=torch.float64).log()
    s = torch.empty(batch, 1, dtype=torch.float64).uniform_(1.1, 1.8, generator=gen)
    ranked = (-s * log_rank).float() + 0.3 * torch.randn(batch, vocab, generator=gen)
    order = torch.rand(batch, vocab, generator=gen).argsort(-1)
    return torch.empty_like(ranked).scatter_(1, order, ranked)


def nucleus_sizes(logits: torch.Tensor, top_p: float) -> list[float]:
    """Median, 90th and 99th percentile of the rows' top-p nucleus sizes."""
    probs = torch.softmax(logits, -1).sort(-1, descending=True).values
    size = ((probs.cumsum(-1) - probs) < top_p).sum(-1).float()
    return [round(v, 1) for v in torch.quantile(size, torch.tensor([0.5, 0.9, 0.99])).tolist()]


def int8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8 weights and their float scales."""
    scale = w.abs().amax(1).clamp_min(1e-12) / 127
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def time_linears(x: torch.Tensor, weights: list[torch.Tensor], repeats: int) -> dict:
    """Milliseconds to apply every weight to x in float32, bfloat16 and int8 weight-only."""
    xb, bf16 = x.bfloat16(), [w.bfloat16() for w in weights]
    int8 = [int8_weights(w) for w in weights]
    row = {
        "float32": best_ms(lambda: [torch.nn.functional.linear(x, w) for w in weights], repeats),
        "bfloat16": best_ms(lambda: [torch.nn.functional.linear(xb, w) for w in bf16], repeats),
        "int8_weight_only": best_ms(lambda: [torch._weight_int8pack_mm(x, q, s) for q, s in int8], repeats),  # noqa: E501
    }  # fmt: skip
    row["bfloat16_over_float32"] = round(row["bfloat16"] / row["float32"], 2)
    row["int8_over_float32"] = round(row["int8_weight_only"] / row["float32"], 2)
    return row


def time_sampling(logits: torch.Tensor, repeats: int, gen: torch.Generator) -> dict:
    """Milliseconds to choose one token per row at the corpus settings, both ways."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    from analoglock.sampling import nucleus_sample

    ids = torch.randint(logits.shape[-1], (logits.shape[0], 100), generator=gen)
    rep, temp, top_p = (
        RepetitionPenaltyLogitsProcessor(1.1),
        TemperatureLogitsWarper(0.8),
        TopPLogitsWarper(0.95),
    )

    def hf() -> torch.Tensor:
        scores = top_p(ids, temp(ids, rep(ids, logits.clone())))
        return torch.multinomial(torch.softmax(scores, dim=-1), 1)

    def ours() -> torch.Tensor:
        return nucleus_sample(rep(ids, logits.clone()), 0.8, 0.95)

    row = {"transformers": best_ms(hf, repeats), "nucleus_sample": best_ms(ours, repeats)}
    row["speedup"] = round(row["transformers"] / row["nucleus_sample"], 2)
    row["nucleus_size_quantiles_50_90_99"] = nucleus_sizes(logits / 0.8, 0.95)
    return row


def model_logits(spec: str, batch: int, steps: int) -> torch.Tensor:
    """The scores `nucleus_sample` sees at the first `steps` steps of a corpus batch: [steps *
    batch, vocab], after the repetition penalty, in the order they came."""
    from analoglock import generation, sampling
    from analoglock.corpus import batch_requests
    from analoglock.model import load_model

    model = load_model(spec)
    prompts = [generation.chat_prompt(model, r) for r in batch_requests(0, 0, batch)]
    seen, sample = [], sampling.nucleus_sample

    def keep(scores, *args, **kwargs):
        seen.append(scores.clone())
        return sample(scores, *args, **kwargs)

    # through the bridge, so transformers' generate calls it from `sampling.NucleusSampler`
    sampling.nucleus_sample = keep
    try:
        generation.generate(model, prompts, max_new_tokens=steps, do_sample=True, temperature=0.8,
                            top_p=0.95, repetition_penalty=1.1, seed=0, batch_size=batch)  # fmt: skip
    finally:
        sampling.nucleus_sample = sample
    return torch.cat(seen)


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(args.d_mlp, args.d_model, generator=gen) for _ in range(args.layers)]
    linear, sampling = {}, {}
    for b in args.batch:
        x = torch.randn(b, args.d_model, generator=gen)
        linear[str(b)] = time_linears(x, weights, args.repeats)
        sampling[str(b)] = time_sampling(lm_like_logits(b, args.vocab, gen), args.repeats, gen)
    if args.model:
        rows = model_logits(args.model, max(args.batch), args.model_steps)
        sampling_model = {str(b): time_sampling(rows[-b:], args.repeats, gen) for b in args.batch}  # fmt: skip  # noqa: E501
        sampling_model["nucleus_size_quantiles_50_90_99_all_steps"] = nucleus_sizes(
            rows / 0.8, 0.95
        )
    ref = torch.nn.functional.linear(x, weights[0])
    int8_out = torch._weight_int8pack_mm(x, *int8_weights(weights[0]))
    int8_err = float((int8_out - ref).norm() / ref.norm())

    print(
        json.dumps(
            {
                "linear_ms": linear,
                "int8_relative_error": round(int8_err, 5),
                "sampling_ms": sampling,
                **({"sampling_ms_model": sampling_model, "model": args.model} if args.model else {}),
                "shapes": {"layers": args.layers, "d_model": args.d_model, "d_mlp": args.d_mlp,
                           "vocab": args.vocab},  # fmt: skip
                "torch_threads": torch.get_num_threads(),
                "cpu_flags": [f for f in flags if f in cpuinfo.split()],
                "load_average": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
            }
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
