"""How tokens are drawn from the model's scores: top-p sampling with transformers' distribution,
without its per-step sort of the whole vocabulary, and transformers' repetition penalty.

transformers samples by sorting the whole vocabulary for top-p and drawing from a softmax over
it, every step: at batch 128 over SmolLM2's 49,152 tokens that sort and draw took longer than the
model's forward. `nucleus_sample` draws from the same distribution (temperature, then top-k, then
top-p, as transformers orders its warpers) from the 64 most likely tokens, then the 512 and the
4,096 most likely for rows whose nucleus may be wider, sorting the whole vocabulary only for rows
wider still (a top-64 costs 4.9 ms at batch 128 here, a top-1024 22.8 ms; SmolLM2's story nuclei
at temperature 0.8, top-p 0.95: median 13 tokens, 13% over 64, 0.1% over 1,024; a step's draw
14.4 ms, against 32.4 ms from the top 1,024 alone). The top 64 is read block by block (`_top_k`,
3.0 ms against 5.1) and the probabilities come from one fused log-softmax (2.2 ms against 4.7 for
logsumexp): a draw at batch 128 takes ~7 ms alone, ~12 ms inside a decoding step.
`generation.generate` runs it as the last logits processor of a greedy decode (`NucleusSampler`),
which marks the drawn token so that greedy's argmax picks it; `generation.decode` calls it
directly. The draws are other draws than transformers' (another sequence of random numbers), so
sampled text differs for the same seed; greedy decoding is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.generation.logits_process import LogitsProcessor


def _top_k(x: torch.Tensor, k: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(k, dim=-1)` (values sorted, most likely first; which of equal values is taken may
    differ) for [rows, n] `x`, read block by block: every one of a row's k largest lies in one of
    the k blocks with the largest maxima, so only those k * `block` values are ranked. At batch
    128 over SmolLM2's 49,152 tokens, k = 64: 3.0 ms against 5.1 ms for `topk` over all."""
    rows, n = x.shape
    if n % block or 4 * k * block > n:  # too few blocks to gain from
        return x.topk(k, dim=-1)
    blocks = x.view(rows, n // block, block)
    best = blocks.amax(-1).topk(k, dim=-1).indices  # [rows, k] block numbers
    cand = blocks.gather(1, best[..., None].expand(rows, k, block)).view(rows, k * block)
    top, at = cand.topk(k, dim=-1)
    idx = best.gather(1, at // block) * block + at % block
    return top, idx


def nucleus_sample(
    scores: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    candidates: Sequence[int] = (64, 512, 4096),
    overwrite: bool = False,
) -> torch.Tensor:
    """One token id per row of `scores` [batch, vocab], drawn as transformers' sampling draws it:
    softmax(scores / temperature) restricted to the `top_k` most likely tokens (None or 0: all),
    then to the smallest most-likely set whose probability reaches `top_p` (a token is kept when
    the probability of the tokens ranked above it is below top_p; the most likely is always kept),
    renormalised. Uses the torch generator, so `torch.manual_seed` fixes the draws.
    `overwrite=True` lets it scale float32 `scores` in place (no second [batch, vocab] tensor)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = scores.float()
    if temperature != 1.0:
        logits = (
            logits.div_(temperature) if overwrite and logits is scores else logits / temperature
        )
    vocab = logits.shape[-1]
    limit = min(top_k, vocab) if top_k else vocab
    if top_p >= 1.0 and limit == vocab:  # nothing to cut: a plain softmax draw
        return torch.multinomial(torch.softmax(logits, dim=-1), 1)[:, 0]

    def draw(rows: torch.Tensor, k: int, normalised: bool):
        """From the k most likely tokens of each row (log-probabilities if `normalised`, else
        logits normalised over those k)."""
        top, idx = _top_k(rows, k)  # sorted, most likely first
        probs = (top if normalised else top - torch.logsumexp(top, -1, keepdim=True)).exp()
        keep = (probs.cumsum(-1) - probs) < top_p if top_p < 1 else torch.ones_like(top, dtype=bool)
        keep[:, 0] = True
        choice = torch.multinomial(probs * keep, 1)
        return idx.gather(1, choice)[:, 0], keep[:, -1]  # and: might the nucleus go on?

    if limit < vocab:  # transformers cuts to the top_k first and renormalises over them
        return draw(logits, limit, False)[0]
    # one fused pass (2.2 ms at batch 128 over 49,152 tokens; logsumexp's took 4.7 ms)
    logp = torch.log_softmax(logits, dim=-1)
    tokens, rows = None, None  # rows: those still to draw (None: all)
    for k in sorted({min(c, vocab) for c in candidates} | {vocab}):
        drawn, may_continue = draw(logp if rows is None else logp[rows], k, True)
        if rows is None:
            tokens = drawn
        else:
            tokens[rows] = drawn
        wider = may_continue.nonzero()[:, 0]  # these rows' nucleus may be wider: draw again
        if k == vocab or len(wider) == 0:
            return tokens
        rows = wider if rows is None else rows[wider]
    return tokens


class NucleusSampler(LogitsProcessor):
    """`nucleus_sample` as the last logits processor of a greedy decode: the drawn token's score
    is set to +inf, so greedy's argmax returns it (see the module docstring)."""

    def __init__(self, temperature: float, top_p: float, top_k: int | None = None):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = nucleus_sample(scores, self.temperature, self.top_p, self.top_k)
        return scores.scatter_(1, tokens[:, None], float("inf"))


# generation-config warpers NucleusSampler does not reproduce: with one of these set, transformers
# samples (see generation.generate's hf_sampling)
_OTHER_WARPERS = ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")


def sampling_kwargs(hf, do_sample: bool, temperature: float, top_p: float, hf_sampling: bool):
    """generate() kwargs for greedy decoding, for transformers' sampling, or for NucleusSampler."""
    if not do_sample:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    config = hf.generation_config
    other = [w for w in _OTHER_WARPERS if getattr(config, w, None) not in (None, 0, 0.0, 1.0)]
    if hf_sampling or other:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    sampler = NucleusSampler(temperature, top_p, getattr(config, "top_k", None))
    return {
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "logits_processor": [sampler],
    }


def penalise_repeats_(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """transformers' repetition penalty, in place: every id in `seen` (the prompt, its padding and
    what was generated) has its score divided by `penalty` if positive, multiplied if negative."""
    s = scores.gather(1, seen)
    scores.scatter_(1, seen, torch.where(s < 0, s * penalty, s / penalty))
