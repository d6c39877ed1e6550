"""How much of the model's behaviour a basis keeps: next-token loss with the reconstruction spliced in.

Any reconstruction (a basis's decode(encode(x)), zero, the mean) replaces the activation at one
hook for every real token. We report the CE increase over the clean run in nats (the number that
does not depend on a baseline), and the fraction of CE recovered against two ablations: zero
(the usual number of the SAE literature, an easy bar: zeroing the whole residual stream destroys
the model) and the mean activation (the harder, more honest bar: what a constant keeps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from analoglock.activations import plan_batches, tokenize_documents
from analoglock.data.documents import Document
from analoglock.hooks import stop_layer, validate_hook
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
    toks = tokenize_documents(model, docs, max_length, batch_tokens=batch_tokens)
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


@torch.no_grad()
def mean_activation(
    model, docs: Sequence[Document], hook: str, batch_tokens: int = 4096, max_length: int = 256
) -> Tensor:
    """Mean activation at `hook` over the real, non-BOS tokens of `docs` (float64, on CPU)."""
    toks = tokenize_documents(model, docs, max_length, batch_tokens=batch_tokens)
    total, count = None, 0
    stop = stop_layer([hook], model.cfg.n_layers)
    for members in plan_batches([len(t.ids) for t in toks], batch_tokens):
        ids, mask = pad_ids([toks[i].ids for i in members], model.tokenizer.pad_token_id)
        keep = mask.bool().clone()
        for r, i in enumerate(members):
            keep[r, : toks[i].first_real] = False
        got: dict[str, Tensor] = {}

        def grab(x: Tensor, hook=None, got=got) -> None:
            got["x"] = x.detach()

        with model.hooks(fwd_hooks=[(hook, grab)]):
            model(ids, attention_mask=mask, stop_at_layer=stop, return_type=None)
        rows = got["x"][keep.to(got["x"].device)].double().cpu()
        total = rows.sum(0) if total is None else total + rows.sum(0)
        count += len(rows)
    if not count:
        raise ValueError("No real tokens to average: every document is empty after BOS.")
    return total / count


def _recovered(baseline: float, spliced: float, clean: float) -> float:
    """(baseline - spliced) / (baseline - clean): 1 = as good as clean, 0 = as bad as baseline."""
    denom = baseline - clean
    return (baseline - spliced) / denom if abs(denom) > 1e-12 else float("nan")


def splice_quality(
    model,
    docs: Sequence[Document],
    hook: str,
    reconstruct: Reconstruct,
    mean: Tensor | None = None,
    **kw,
) -> dict[str, float]:
    """Clean, spliced, zero- and mean-ablated CE; the increase in nats; CE recovered vs both.

    `mean` is the activation that mean ablation writes at every real token: by default the mean
    over these documents' tokens; pass the training rows' mean to keep evaluation data out of it.
    """
    validate_hook(model, hook)
    if mean is None:
        mean = mean_activation(model, docs, hook)
    mean = mean.detach().float()
    clean = next_token_ce(model, docs, **kw)
    spliced = next_token_ce(model, docs, hook, reconstruct, **kw)
    zero = next_token_ce(model, docs, hook, torch.zeros_like, **kw)
    const = next_token_ce(model, docs, hook, lambda x: mean.to(x).expand_as(x), **kw)
    return {
        "clean_ce": clean,
        "spliced_ce": spliced,
        "zero_ablation_ce": zero,
        "mean_ablation_ce": const,
        "ce_increase": spliced - clean,
        "ce_recovered": _recovered(zero, spliced, clean),
        "ce_recovered_vs_mean": _recovered(const, spliced, clean),
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
