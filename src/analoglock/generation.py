"""Text generation from the frozen model, with optional hooks active while it generates.

Decoding runs through the wrapped Hugging Face model's own `generate` (KV cache, left padding),
so greedy output equals Hugging Face's; the bridge's hook points still fire because the bridge
wraps those very modules. This sidesteps the bridge's own `generate`, whose KV-cache path
produced garbage on SmolLM2 (see FACTS.md). Hooks see the prompt once (all positions), then one
new position per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from analoglock.tokens import pad_ids, prepend_bos_id

Hook = tuple[str, Callable]


@dataclass(frozen=True)
class Generation:
    """Prompts, completions and the new token ids of each."""

    prompts: list[str]
    completions: list[str]
    new_tokens: list[list[int]]


def chat_prompt(model, user_message: str) -> str:
    """Wrap a user message in the model's chat template (instruct models answer better)."""
    tok = model.tokenizer
    if not getattr(tok, "chat_template", None):
        return user_message
    return tok.apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
    )


def encode_prompts(model, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, BOS prepended as `model.to_tokens` does (unless the text has it)."""
    tok = model.tokenizer
    bos = prepend_bos_id(model)
    rows = []
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        rows.append(ids)
    return pad_ids(rows, tok.pad_token_id, side="left")


@torch.no_grad()
def generate(
    model,
    prompts: str | Sequence[str],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    fwd_hooks: Sequence[Hook] = (),
    batch_size: int = 16,
    progress: bool = False,
) -> Generation:
    """Greedy or sampled continuations of a batch of prompts, with `fwd_hooks` active throughout."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    hf = model.original_model
    tok = model.tokenizer
    completions: list[str] = []
    new_tokens: list[list[int]] = []
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if do_sample
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    eos = tok.eos_token_id
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generate", disable=not progress):
            ids, mask = encode_prompts(model, prompts[start : start + batch_size])
            device = model.cfg.device
            with model.hooks(fwd_hooks=list(fwd_hooks)):
                out = hf.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=eos,
                    repetition_penalty=repetition_penalty,
                    **sampling,
                )
            for row in out[:, ids.shape[1] :].tolist():
                if eos in row:  # rows that stopped early are padded after their EOS
                    row = row[: row.index(eos)]
                new_tokens.append(row)
                completions.append(tok.decode(row, skip_special_tokens=True))
    return Generation(prompts, completions, new_tokens)
