"""How much of the model's behaviour a basis keeps: next-token loss with the reconstruction spliced in.

Any reconstruction (a basis's decode(encode(x)), zero, the mean) replaces the activation at one
hook for every real token; we compare the model's next-token cross-entropy against the clean run
and against zero-ablation, the usual "CE recovered" of the SAE literature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from analoglock.activations import plan_batches, tokenize_documents
from analoglock.data.documents import Document
from analoglock.hooks import validate_hook
from analoglock.tokens import pad_ids

Reconstruct = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def next_token_ce(
    model,
    docs: Sequence[Document],
    hook: str | None = None,
    reconstruct: Reconstruct | None = None,
    skip_bos: bool = True,
    batch_tokens: int = 4096,
    max_length: int = 256,
) -> float:
    """Mean next-token cross-entropy over real tokens, with `reconstruct` spliced in at `hook`."""
    toks = tokenize_documents(model, docs, max_length)
    total, count = 0.0, 0
    for members in plan_batches([len(t.ids) for t in toks], batch_tokens):
        ids, mask = pad_ids([toks[i].ids for i in members], model.tokenizer.pad_token_id)
        hooks = []
        if hook is not None and reconstruct is not None:

            def splice(x: torch.Tensor, hook=None, mask=mask) -> torch.Tensor:  # TL passes hook=
                keep = mask.bool().clone()
                if skip_bos:
                    keep[:, 0] = False  # BOS is an attention sink with a huge norm: left as is
                out = x.clone()
                out[keep] = reconstruct(x[keep]).to(x.dtype)
                return out

            hooks = [(hook, splice)]
        with model.hooks(fwd_hooks=hooks):
            logits = model(ids, attention_mask=mask)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = ids[:, 1:]
        nll = -logp.gather(-1, target[..., None])[..., 0]
        valid = mask[:, 1:].bool()
        total += float(nll[valid].sum())
        count += int(valid.sum())
    return total / max(count, 1)


def splice_quality(
    model, docs: Sequence[Document], hook: str, reconstruct: Reconstruct, **kw
) -> dict[str, float]:
    """Clean, spliced and zero-ablated CE; the increase; and the fraction of CE recovered vs zero."""
    validate_hook(model, hook)
    clean = next_token_ce(model, docs, **kw)
    spliced = next_token_ce(model, docs, hook, reconstruct, **kw)
    zero = next_token_ce(model, docs, hook, torch.zeros_like, **kw)
    denom = zero - clean
    return {
        "clean_ce": clean,
        "spliced_ce": spliced,
        "zero_ablation_ce": zero,
        "ce_increase": spliced - clean,
        "ce_recovered": (zero - spliced) / denom if abs(denom) > 1e-12 else float("nan"),
    }
