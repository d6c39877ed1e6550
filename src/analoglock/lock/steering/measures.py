"""Measures of one steered (or unsteered) run, one value per prompt, item or neutral prompt.

Owns the numbers that say what steering did and at what cost: the sentence judge's domain score
and the rank of a continuation's own workplace analogue among the split's workplace stories;
teacher-forced role transfer (the rank of the paired workplace role's first token); fluency
(perplexity of the continuation alone), diversity (distinct n-grams) and loops (a repeated
4-gram); KL on neutral prompts; and next-token mass on each domain's vocabulary. Values are kept
per unit so that every comparison can be paired and bootstrapped. Knows nothing of artifacts or
of which arms exist; `evaluate` does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from analoglock.lock.steering.hooks import (
    RowPositions,
    Steering,
    steered_logits,
    steered_logprobs,
)
from analoglock.lock.steering.prompts import RoleItem, role_token_positions
from analoglock.tokens import encode_texts, prepend_bos_id

LOOP_N = 4  # a loop repeats some 4-gram; shorter repeats are common in plain prose
LOOP_MIN_COUNT = 3  # ... at least three times in one continuation


# ---------------------------------------------------------------- judge geometry


def domain_scores(
    emb: Annotated[Tensor, "n d_embed"],
    a_centroid: Annotated[Tensor, "d_embed"],
    b_centroid: Annotated[Tensor, "d_embed"],
) -> Annotated[Tensor, "n"]:
    """cos(text, B centroid) - cos(text, A centroid) for unit-norm embeddings: > 0 reads as B."""
    return emb @ b_centroid - emb @ a_centroid


def cosine_ranks(
    emb: Annotated[Tensor, "n d_embed"],
    candidates: Annotated[Tensor, "k d_embed"],
    own: Sequence[int | None],
) -> Annotated[Tensor, "n"]:
    """Rank (1 = closest) of each text's own candidate by cosine; NaN where `own` is None.

    Ties count in the text's favour only once: rank = 1 + #candidates strictly closer.
    """
    out = torch.full((len(own),), float("nan"))
    if len(candidates) == 0 or all(j is None for j in own):
        return out
    sim = (
        torch.nn.functional.normalize(emb.float(), dim=-1)
        @ torch.nn.functional.normalize(candidates.float(), dim=-1).T
    )
    out = torch.full((len(own),), float("nan"))
    for i, j in enumerate(own):
        if j is not None:
            out[i] = 1.0 + float((sim[i] > sim[i, j]).sum())
    return out


# ---------------------------------------------------------------- role transfer


@torch.no_grad()
def role_transfer_ranks(
    model,
    items: Sequence[RoleItem],
    steering: Steering | None = None,
    batch_size: int = 16,
    positions: Sequence[RowPositions] | None = None,
) -> Annotated[Tensor, "n_items"]:
    """Per item: rank (1 = best) of the paired workplace role's first token among the candidates,
    by the next-token log-prob after the fable prefix, teacher-forced under `steering`.

    The prefix is the prompt: "roles" steers its role mentions, "prompt" and "all" every token,
    "new" the last one (the position that predicts the role). `positions` caches each
    prefix's `RowPositions` (computed from the text when None).
    """
    if not items:
        return torch.zeros(0)
    rows = encode_texts(model, [it.prefix for it in items])
    skip = prepend_bos_id(model) is not None
    where = positions or [
        RowPositions(len(r), len(r), role_token_positions(model, it.prefix, it.roles), skip)
        for r, it in zip(rows, items, strict=True)
    ]
    out = torch.zeros(len(items))
    # logits rank the candidates as log-probs do (one shift per row); only the last row is read
    for i, logits in steered_logits(model, rows, steering, where, batch_size):
        last = logits[-1]
        cands = torch.tensor(items[i].candidates, dtype=torch.long)
        out[i] = 1.0 + float((last[cands] > last[items[i].target]).sum())
    return out


def chance_mrr(n_candidates: Sequence[int]) -> float:
    """Expected mean reciprocal rank when the answer's rank is uniform among k candidates."""
    if not n_candidates:
        return float("nan")
    return sum(sum(1.0 / r for r in range(1, k + 1)) / k for k in n_candidates) / len(n_candidates)


# ---------------------------------------------------------------- fluency, diversity, loops


def _bos_id(model) -> int:
    """The id that starts a sequence scored without its prompt."""
    tok = model.tokenizer
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


@torch.no_grad()
def continuation_perplexity(
    model, token_ids_list: Sequence[Sequence[int]], batch_size: int = 16
) -> Annotated[Tensor, "n"]:
    """Perplexity of each continuation alone (BOS + its tokens) under the unsteered model.

    The prompt is left out on purpose: steering is meant to change the topic, and a fable prompt
    followed by an office story is improbable under the model however fluent the office story
    is, so scoring with the prompt would count the intended effect as lost fluency. Alone, the
    score asks only whether the text reads like text. An empty continuation scores NaN.
    """
    bos = _bos_id(model)
    rows = [[bos, *ids] for ids in token_ids_list]
    out = torch.full((len(rows),), float("nan"))
    for i, logp in steered_logprobs(model, rows, None, None, batch_size):
        targets = torch.tensor(rows[i][1:], dtype=torch.long)
        if len(targets):
            nll = -logp[:-1].gather(1, targets[:, None]).mean()
            out[i] = torch.exp(nll)
    return out


def distinct_n(token_ids_list: Sequence[Sequence[int]], n: int = 2) -> Annotated[Tensor, "n_texts"]:
    """Per continuation: distinct n-grams / n-grams (1 = no repeats; NaN if shorter than n).

    Perplexity alone misses degenerate loops ("for a team for a team ..."), which the model
    finds very probable; a collapsing distinct-2 catches them.
    """
    out = torch.full((len(token_ids_list),), float("nan"))
    for i, ids in enumerate(token_ids_list):
        grams = [tuple(ids[k : k + n]) for k in range(len(ids) - n + 1)]
        if grams:
            out[i] = len(set(grams)) / len(grams)
    return out


def has_loop(
    token_ids_list: Sequence[Sequence[int]], n: int = LOOP_N, min_count: int = LOOP_MIN_COUNT
) -> Annotated[Tensor, "n_texts"]:
    """Per continuation: 1.0 if some n-gram occurs at least `min_count` times (a loop), else 0.0."""
    out = torch.zeros(len(token_ids_list))
    for i, ids in enumerate(token_ids_list):
        counts = Counter(tuple(ids[k : k + n]) for k in range(len(ids) - n + 1))
        out[i] = float(bool(counts) and max(counts.values()) >= min_count)
    return out


# ---------------------------------------------------------------- collateral damage


@torch.no_grad()
def neutral_kl_values(
    model,
    neutral_prompts: Sequence[str],
    steering: Steering | None,
    batch_size: int = 16,
    clean: dict[int, Tensor] | None = None,
) -> Annotated[Tensor, "n_neutral"]:
    """Per neutral prompt: mean over positions of KL(unsteered || steered) next-token distributions.

    On prompts from neither domain this is the collateral damage of steering: 0 means the
    intervention leaves unrelated text alone. Neutral prompts mention no roles, so "roles"
    steering leaves them untouched by construction. `clean` caches the unsteered log-probs.
    """
    rows = encode_texts(model, neutral_prompts)
    if clean is None:
        clean = dict(steered_logprobs(model, rows, None, None, batch_size))
    out = torch.zeros(len(rows))
    if steering is None:
        return out
    for i, logq in steered_logprobs(model, rows, steering, None, batch_size):
        logp = clean[i]
        out[i] = (logp.exp() * (logp - logq)).sum(-1).mean()
    return out


def neutral_kl(
    model, neutral_prompts: Sequence[str], steering: Steering | None, batch_size: int = 16
) -> float:
    """Mean over prompts of `neutral_kl_values`: one number for the collateral damage."""
    values = neutral_kl_values(model, neutral_prompts, steering, batch_size)
    return float(values.mean()) if len(values) else float("nan")


# ---------------------------------------------------------------- vocabulary mass


def domain_vocab(
    model,
    a_texts: Sequence[str],
    b_texts: Sequence[str],
    top_n: int = 200,
    alpha: float = 0.5,
) -> tuple[Annotated[Tensor, "n_a"], Annotated[Tensor, "n_b"]]:
    """Token ids over-represented in A's texts and in B's texts, most distinctive first.

    Smoothed log-odds ratio of each token's count (Dirichlet prior `alpha` per token; Monroe et
    al. 2008), ranked by its z-score so that a token seen once in one domain does not outrank one
    seen fifty times. Special tokens and tokens shorter than 3 characters after strip (" a",
    ",", "ing") are left out: they carry grammar, not topic.
    """
    tok = model.tokenizer
    n_vocab = model.cfg.d_vocab
    counts = torch.zeros(2, n_vocab, dtype=torch.float64)
    for row, texts in enumerate((a_texts, b_texts)):
        for text in texts:
            ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            ids = ids[ids < n_vocab]
            counts[row] += torch.bincount(ids, minlength=n_vocab).double()
    seen = counts.sum(0) > 0
    c_a, c_b = counts[0, seen], counts[1, seen]
    prior = alpha * int(seen.sum())
    n_a, n_b = c_a.sum(), c_b.sum()
    delta = torch.log((c_b + alpha) / (n_b + prior - c_b - alpha)) - torch.log(
        (c_a + alpha) / (n_a + prior - c_a - alpha)
    )
    z = delta / torch.sqrt(1.0 / (c_a + alpha) + 1.0 / (c_b + alpha))
    ids = seen.nonzero().squeeze(1)
    special = set(tok.all_special_ids)
    keep = torch.tensor(
        [int(i) not in special and len(tok.decode([int(i)]).strip()) >= 3 for i in ids],
        dtype=torch.bool,
    )
    ids, z = ids[keep], z[keep]
    order = torch.argsort(z, descending=True, stable=True)
    b_ids = ids[order][z[order] > 0][:top_n]
    a_ids = ids[order.flip(0)][z[order.flip(0)] < 0][:top_n]
    return a_ids, b_ids


@torch.no_grad()
def domain_mass(
    model,
    prompts: Sequence[str],
    completions_token_ids: Sequence[Sequence[int]],
    vocab_a: Tensor,
    vocab_b: Tensor,
    steering: Steering | None = None,
    batch_size: int = 16,
    roles: Sequence[Sequence[int]] | None = None,
) -> Annotated[Tensor, "n_prompts"]:
    """Per prompt: mean next-token probability on B's vocabulary minus on A's, while continuing.

    Teacher-forced over prompt + continuation under `steering` (on the positions its rule names;
    `roles[i]`: the role-token indices of prompt i, for the "roles" rule); averaged over every
    distribution the model produced while writing the continuation: at the prompt's last token
    and after each continuation token (so an empty continuation still has one).
    """
    if len(prompts) != len(completions_token_ids):
        raise ValueError(
            f"{len(prompts)} prompts but {len(completions_token_ids)} continuations; "
            "give one continuation (token ids) per prompt."
        )
    if roles is not None and len(roles) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(roles)} role-position lists")
    skip = prepend_bos_id(model) is not None
    starts, rows, where = [], [], []
    for i, (ids, cont) in enumerate(
        zip(encode_texts(model, prompts), completions_token_ids, strict=True)
    ):
        starts.append(len(ids) - 1)
        rows.append(list(ids) + list(cont))
        where.append(RowPositions(len(ids), len(rows[-1]), tuple(roles[i]) if roles else (), skip))
    out = torch.zeros(len(rows))
    va, vb = vocab_a.long().cpu(), vocab_b.long().cpu()
    for i, logp in steered_logprobs(model, rows, steering, where, batch_size):
        p = logp[starts[i] :].exp()
        out[i] = (p[:, vb].sum(-1) - p[:, va].sum(-1)).mean()
    return out


__all__ = [
    "chance_mrr",
    "continuation_perplexity",
    "cosine_ranks",
    "distinct_n",
    "domain_mass",
    "domain_scores",
    "domain_vocab",
    "has_loop",
    "neutral_kl",
    "neutral_kl_values",
    "role_transfer_ranks",
]
