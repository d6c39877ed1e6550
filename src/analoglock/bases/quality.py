"""How much of the model's behaviour a basis keeps: next-token loss with the reconstruction spliced in.

Any reconstruction (a basis's decode(encode(x)), zero, the mean) replaces the activation at one
hook for every real token. We report the CE increase over the clean run in nats (the number that
does not depend on a baseline), and the fraction of CE recovered against two ablations: zero
(the usual number of the SAE literature, an easy bar: zeroing the whole residual stream destroys
the model) and the mean activation (the harder, more honest bar: what a constant keeps).

Every held-out number here (FVU too) is a ratio of sums over documents, so each also comes per
document (`fvu_per_doc`, `splice_quality_per_doc`): `heldout_intervals` bootstraps it over
documents, and two bases measured on the same documents can be compared paired.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from analoglock.activations import plan_batches, tokenize_documents
from analoglock.data.documents import Document
from analoglock.hooks import stop_layer, validate_hook
from analoglock.stats import (
    EPS,
    as_rows,
    bootstrap_indices,
    centred_sum_sq,
    percentile_interval,
)
from analoglock.tokens import pad_ids

Reconstruct = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def next_token_nll(
    model,
    docs: Sequence[Document],
    hook: str | None = None,
    reconstruct: Reconstruct | None = None,
    skip_bos: bool = True,
    batch_tokens: int = 4096,
    max_length: int = 256,
) -> tuple[float, Tensor, Tensor]:
    """(mean CE, per-document summed NLL, per-document token counts), `reconstruct` spliced in.

    The mean is `next_token_ce`'s number, accumulated as it always was (float32 sums per batch);
    the per-document sums [len(docs)] are float64 and the counts int64, in the order of `docs`,
    so the mean over any resample of documents is sum(nll) / sum(count).
    """
    toks = tokenize_documents(model, docs, max_length, batch_tokens=batch_tokens)
    total, count = 0.0, 0
    doc_nll = torch.zeros(len(toks), dtype=torch.float64)
    doc_count = torch.zeros(len(toks), dtype=torch.int64)
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
        rows = torch.tensor(members)
        doc_nll[rows] = torch.where(valid, nll.double(), 0.0).sum(1).cpu()
        doc_count[rows] = valid.sum(1).cpu()
    return total / max(count, 1), doc_nll, doc_count


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
    return next_token_nll(model, docs, hook, reconstruct, skip_bos, batch_tokens, max_length)[0]


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


def splice_quality_per_doc(
    model,
    docs: Sequence[Document],
    hook: str,
    reconstruct: Reconstruct,
    mean: Tensor | None = None,
    **kw,
) -> tuple[dict[str, float], dict[str, list]]:
    """`splice_quality`'s numbers, and per document what they are made of (see `CE_RUNS`).

    The per-document part holds `doc_ids`, `n_tokens` (real tokens predicted, the same in every
    run) and, per run, the NLL summed over the document's tokens: every number of the first part
    is a ratio of sums of these (`heldout_ratio`), so it can be recomputed on a resample of the
    documents, or paired with another reconstruction's on the same documents.
    """
    validate_hook(model, hook)
    if mean is None:
        mean = mean_activation(model, docs, hook)
    mean = mean.detach().float()
    runs = {
        "clean": next_token_nll(model, docs, **kw),
        "spliced": next_token_nll(model, docs, hook, reconstruct, **kw),
        "zero_ablation": next_token_nll(model, docs, hook, torch.zeros_like, **kw),
        "mean_ablation": next_token_nll(model, docs, hook, lambda x: mean.to(x).expand_as(x), **kw),
    }
    clean, spliced, zero, const = (runs[r][0] for r in CE_RUNS)
    summary = {
        "clean_ce": clean,
        "spliced_ce": spliced,
        "zero_ablation_ce": zero,
        "mean_ablation_ce": const,
        "ce_increase": spliced - clean,
        "ce_recovered": _recovered(zero, spliced, clean),
        "ce_recovered_vs_mean": _recovered(const, spliced, clean),
    }
    counts = runs["clean"][2]
    for r in CE_RUNS:
        if not torch.equal(runs[r][2], counts):  # the same tokens are predicted in every run
            raise RuntimeError(f"the {r} run counted other tokens than the clean run")
    per_doc: dict[str, list] = {"doc_ids": [d.id for d in docs], "n_tokens": counts.tolist()}
    per_doc.update({f"{r}_nll_sum": runs[r][1].tolist() for r in CE_RUNS})
    return summary, per_doc


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
    return splice_quality_per_doc(model, docs, hook, reconstruct, mean, **kw)[0]


# ---------------------------------------------------------------- per held-out document

CE_RUNS = ("clean", "spliced", "zero_ablation", "mean_ablation")
# statistic -> (section of the per-document numbers, numerator, denominator): the statistic is
# sum(numerator) / sum(denominator) over documents; "a-b" is the per-document difference a - b.
HELDOUT_RATIOS: dict[str, tuple[str, str, str]] = {
    "fvu": ("fvu", "sum_sq_err", "sum_sq_dev"),
    "ce_increase": ("ce", "spliced_nll_sum-clean_nll_sum", "n_tokens"),
    "ce_recovered": ("ce", "zero_ablation_nll_sum-spliced_nll_sum", "zero_ablation_nll_sum-clean_nll_sum"),
    "ce_recovered_vs_mean": ("ce", "mean_ablation_nll_sum-spliced_nll_sum", "mean_ablation_nll_sum-clean_nll_sum"),
}  # fmt: skip
BOOT_N = 1000
BOOT_SEED = 0
BOOT_LEVEL = 0.95


@torch.no_grad()
def fvu_per_doc(
    x: Tensor, x_hat: Tensor, doc: Tensor, doc_ids: Sequence[str] | None = None
) -> dict[str, list]:
    """FVU's sums per document: squared error, and squared deviation from the mean of all of `x`.

    `x`, `x_hat` [n, d] are rows, `doc` [n] the document of each row. The mean is that of every row
    of `x`, as in `FractionVarianceUnexplained` (held-out FVU centres on the held-out rows' own
    mean), so sum(sum_sq_err) / sum(sum_sq_dev) over all documents is that FVU; on a resample of
    documents the mean stays fixed (a ratio estimator). float64 throughout. Documents without a
    row are left out; `doc_ids[i]` names document i (default: its index).
    """
    if x.shape != x_hat.shape or x.ndim != 2 or len(doc) != len(x):
        raise ValueError(f"need x, x_hat [n, d] and doc [n], got {tuple(x.shape)}, {tuple(x_hat.shape)}, {tuple(doc.shape)}")  # fmt: skip
    x64, doc = x.detach().double(), doc.detach().long().cpu()
    err = (x64 - x_hat.detach().double()).pow(2).sum(-1).cpu()
    dev = (x64 - x64.mean(0)).pow(2).sum(-1).cpu()
    present, where = torch.unique(doc, return_inverse=True)
    sums = torch.zeros(2, len(present), dtype=torch.float64)
    sums[0].index_add_(0, where, err)
    sums[1].index_add_(0, where, dev)
    ids = [str(i) if doc_ids is None else doc_ids[i] for i in present.tolist()]
    return {
        "doc_ids": ids,
        "doc_index": present.tolist(),
        "n_rows": torch.bincount(where, minlength=len(present)).tolist(),
        "sum_sq_err": sums[0].tolist(),
        "sum_sq_dev": sums[1].tolist(),
    }


def _column(section: dict[str, list], expr: str) -> Tensor:
    cols = [torch.tensor(section[c], dtype=torch.float64) for c in expr.split("-")]
    return cols[0] if len(cols) == 1 else cols[0] - cols[1]


def ratio_spec(key: str) -> tuple[str, str, str]:
    """HELDOUT_RATIOS[key] (section, numerator, denominator), or a KeyError naming the valid keys."""
    if key not in HELDOUT_RATIOS:
        raise KeyError(f"No per-document form of {key!r}; have {', '.join(HELDOUT_RATIOS)}")
    return HELDOUT_RATIOS[key]


def heldout_ratio(per_doc: dict[str, dict[str, list]], key: str) -> tuple[Tensor, Tensor]:
    """(numerator, denominator) per document of a held-out statistic (a key of HELDOUT_RATIOS):
    the statistic over any set of documents is sum(numerator) / sum(denominator)."""
    section, num, den = ratio_spec(key)
    return _column(per_doc[section], num), _column(per_doc[section], den)


def ratio_draws(num: Tensor, den: Tensor, idx: Tensor) -> Tensor:
    """sum(num) / sum(den) over each row of document indices `idx` [n_boot, n]."""
    return num[idx].sum(-1) / den[idx].sum(-1)


def heldout_intervals(
    per_doc: dict[str, dict[str, list]],
    n_boot: int = BOOT_N,
    seed: int = BOOT_SEED,
    level: float = BOOT_LEVEL,
) -> dict[str, Any]:
    """`<statistic>_ci95`: [lo, hi] of every statistic `per_doc` has the sections for, bootstrapped
    over documents (percentile interval; each draw resamples whole documents), and `bootstrap`:
    the unit, n_boot, seed, level and the number of documents behind each statistic."""
    out: dict[str, Any] = {}
    n_docs: dict[str, int] = {}
    for key, (section, _, _) in HELDOUT_RATIOS.items():
        if section not in per_doc:
            continue
        num, den = heldout_ratio(per_doc, key)
        draws = ratio_draws(num, den, bootstrap_indices(len(num), n_boot, seed))
        out[f"{key}_ci{round(level * 100)}"] = list(percentile_interval(draws, level))
        n_docs[key] = len(num)
    if n_docs:
        out["bootstrap"] = {
            "unit": "held-out document (resampled with replacement)",
            "n_boot": n_boot,
            "seed": seed,
            "level": level,
            "n_docs": n_docs,
        }
    return out


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
