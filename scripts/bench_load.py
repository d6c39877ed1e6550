"""Benchmark `load_model`: warm (in a process that has loaded it before) and cold (a fresh process).

Prints ONE JSON object:
- `warm_load_s`: median wall time of `load_model(spec)` in a process that already loaded it once:
  imports done, dequantized weights cached on disk, their files in the OS page cache, the
  previous model garbage-collected before the clock starts. What the library itself costs per
  load (hashing, reading, tokenizer, booting the bridge).
- `first_load_s`: the first `load_model` of the process (imports transformer_lens; dequantizes
  the GGUF if nothing is cached yet).
- `cold_load_s`: median wall time of a fresh `python -c "load_model(spec)"` process, interpreter
  start and every import (torch, transformers, transformer_lens) included, with the dequantized
  weights already cached on disk. The OS page cache is NOT dropped (that needs root and slows
  every other process on a shared machine), so files are probably read from RAM; a first load
  after a reboot also reads ~540 MB of weights and the libraries' files from disk.
  `cold_breakdown` splits it as the child process saw it.
- `breakdown`: median seconds of each phase of a warm load, timed one by one, and the same
  phases the way `load_model` did them before (whole-file hash, `from_pretrained`, the tokenizer
  read twice), run interleaved so their ratio is fair on a shared machine. `first_forward_s`
  is a short forward just after the load: the weights are memory-mapped, so the first use faults
  their pages in (from the page cache); `second_forward_s` is the same forward again.
- `warm_load_cpu_s`, `cold_load_cpu_s`: CPU seconds (user + system) of the same loads. Loading
  is mostly single-threaded Python, so on a quiet machine its wall time is about its CPU time;
  on a shared one the wall time grows with the load and the CPU time much less.
- `n_runs`, `load_average` (1-minute, at start and end): timings are wall clock and the machine
  may be shared, so read them next to the load average.

    .venv/bin/python scripts/bench_load.py [--model smollm2] [--runs 3] [--cold-runs 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CHILD = """
import json, time
t0 = time.perf_counter()
import torch
from analoglock.model import load_model
t1 = time.perf_counter()
from transformer_lens.model_bridge import TransformerBridge
t2 = time.perf_counter()
load_model({spec!r})
t3 = time.perf_counter()
print(json.dumps({{"import_torch_analoglock_s": t1 - t0, "import_transformer_lens_s": t2 - t1,
                  "load_model_s": t3 - t2}}))
"""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="model spec (default: the embedded SmolLM2)")
    p.add_argument("--runs", type=int, default=3, help="warm loads (and phase timings) to median")
    p.add_argument("--cold-runs", type=int, default=3, help="fresh processes to median")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args()


def timed(fn):
    """(result, seconds)."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def timed_cpu(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of a call, after collecting garbage.

    A bridge is a graph of ~14k modules with reference cycles: the previous load's model is only
    freed by the cycle collector, which would otherwise run (and be timed) inside this load.
    """
    gc.collect()
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def phases(spec: str) -> dict[str, float]:
    """One warm load split into phases, now and as `load_model` did it before (same process)."""
    gc.collect()
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from analoglock import model as M

    t: dict[str, float] = {}
    (source, location, sha), t["resolve_spec_s"] = timed(lambda: M.resolve_spec(spec))
    gguf = source in ("embedded", "gguf") and sha is None
    if gguf:
        sha, t["gguf_hash_cached_s"] = timed(lambda: M.cached_file_sha256(Path(location)))
        _, t["gguf_hash_full_file_before_s"] = timed(lambda: M.file_sha256(Path(location)))
        location = M.dequantized_dir(Path(location), sha)
    tok, t["tokenizer_s"] = timed(lambda: M._load_tokenizer(location, add_bos_token=True))

    def weights():
        if source in ("embedded", "gguf"):  # our cache: read zero-copy
            return M.load_dequantized(Path(location), torch.float32)
        return from_pretrained()  # a local directory or hub model: as before

    def from_pretrained():
        return AutoModelForCausalLM.from_pretrained(
            location, dtype=torch.float32, attn_implementation="eager"
        )

    hf, t["weights_s"] = timed(weights)
    if source in ("embedded", "gguf"):
        _, t["weights_from_pretrained_before_s"] = timed(from_pretrained)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    bridge, t["bridge_boot_s"] = timed(
        lambda: TransformerBridge.boot_transformers(
            str(location), hf_model=hf, tokenizer=tok, device="cpu", dtype=torch.float32
        )
    )
    plain, other = AutoTokenizer.from_pretrained(location), weights()  # before: no add_bos_token,
    _, t["bridge_boot_tokenizer_reread_before_s"] = timed(  # so the bridge read it again
        lambda: TransformerBridge.boot_transformers(
            str(location), hf_model=other, tokenizer=plain, device="cpu", dtype=torch.float32
        )
    )
    _, t["bridge_eval_before_s"] = timed(bridge.eval)  # now skipped when already in eval mode
    _, t["kv_cache_patch_s"] = timed(lambda: M._pass_kv_cache_to_bridge_attention(bridge))
    return t


def first_forwards(spec: str) -> dict[str, float]:
    """A fresh load, then the same short forward twice (mapped pages fault in on first use)."""
    from analoglock.model import load_model

    gc.collect()
    model = load_model(spec)
    tokens = model.to_tokens("Once upon a time, a tortoise and a hare agreed to run a race.")
    with torch.no_grad():
        _, first = timed(lambda: model(tokens))
        _, second = timed(lambda: model(tokens))
    return {"first_forward_s": first, "second_forward_s": second}


def cold_run(spec: str) -> dict[str, float]:
    """One fresh process that imports and loads; its wall time from outside and its own phases."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(spec=spec)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"cold load failed:\n{done.stderr[-3000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    child["interpreter_start_and_exit_s"] = wall - sum(child.values())
    return {"wall_s": wall, "cpu_s": cpu, **child}


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from analoglock.model import load_model

    load0 = os.getloadavg()[0]
    _, first_s = timed(lambda: load_model(args.model))  # dequantizes once if nothing is cached
    warm = [timed_cpu(lambda: load_model(args.model)) for _ in range(args.runs)]
    runs = [phases(args.model) for _ in range(args.runs)]
    fwd = [first_forwards(args.model) for _ in range(args.runs)]
    breakdown = {k: median([r[k] for r in runs]) for k in runs[0]}
    breakdown.update({k: median([r[k] for r in fwd]) for k in fwd[0]})
    now = sum(breakdown.get(k, 0.0) for k in ("gguf_hash_cached_s", "tokenizer_s", "weights_s"))
    before = sum(
        breakdown.get(k, 0.0)
        for k in (
            "gguf_hash_full_file_before_s",
            "tokenizer_s",
            "weights_from_pretrained_before_s",
            "bridge_eval_before_s",
        )
    )
    breakdown["changed_phases_now_s"] = round(now, 3)  # hash + tokenizer + weights
    breakdown["changed_phases_before_s"] = round(  # the same, done the old way, + the re-read
        before + breakdown["bridge_boot_tokenizer_reread_before_s"] - breakdown["bridge_boot_s"], 3
    )
    cold = [cold_run(args.model) for _ in range(args.cold_runs)]
    print(
        json.dumps(
            {
                "model": args.model,
                "warm_load_s": median([w for w, _ in warm]),
                "warm_load_runs_s": [round(w, 3) for w, _ in warm],
                "warm_load_cpu_s": median([c for _, c in warm]),
                "cold_load_s": median([c["wall_s"] for c in cold]),
                "cold_load_cpu_s": median([c["cpu_s"] for c in cold]),
                "cold_breakdown": {k: median([c[k] for c in cold]) for k in cold[0]},
                "first_load_s": round(first_s, 3),
                "breakdown": breakdown,
                "n_runs": args.runs,
                "n_cold_runs": args.cold_runs,
                "torch_threads": torch.get_num_threads(),
                "load_average": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
            }
        )
    )


if __name__ == "__main__":
    main()
