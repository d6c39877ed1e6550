"""How much of the model's behaviour a basis keeps: next-token loss with the reconstruction spliced in.

Any reconstruction (a basis's decode(encode(x)), zero, the mean) replaces the activation at one
hook for every real token; we compare the model's next-token cross-entropy against the clean run
and against zero-ablation, the usual "CE recovered" of the SAE literature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from analoglock.activations import plan_batches, tokenize_documents
from analoglock.data.documents import Document
from analoglock.hooks import validate_hook
from analoglock.stats import EPS, as_rows, centred_sum_sq
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


class FractionVarianceUnexplained(Metric):
    """FVU of a reconstruction: sum ||x - x_hat||^2 / sum ||x - mean x||^2 over the whole set.

    0 is perfect, 1 is as good as predicting the set's mean. States are float64 running sums
    (the mean is the whole set's, not each batch's); `sum_x` starts as a scalar 0 that
    broadcasts to (d,), as in `EquivarianceError`.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    n: Tensor
    sum_sq_err: Tensor
    sum_x: Tensor
    sum_sq_x: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("n", "sum_sq_err", "sum_x", "sum_sq_x"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """Add a batch of (..., d) targets and their reconstructions."""
        if x.shape != x_hat.shape:
            raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
        x, x_hat = as_rows(x), as_rows(x_hat)
        self.n = self.n + len(x)
        self.sum_sq_err = self.sum_sq_err + (x - x_hat).pow(2).sum()
        self.sum_x = self.sum_x + x.sum(dim=0)  # out of place: the scalar 0 broadcasts to (d,)
        self.sum_sq_x = self.sum_sq_x + x.pow(2).sum()

    def compute(self) -> Tensor:
        """FVU over every row seen."""
        if self.n < 1:
            raise RuntimeError("FractionVarianceUnexplained.compute() before any update()")
        return self.sum_sq_err / centred_sum_sq(self.sum_x, self.sum_sq_x, self.n).clamp_min(EPS)
