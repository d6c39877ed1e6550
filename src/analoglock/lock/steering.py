"""Steering: add a relation vector (or apply a map) at a hook while the model runs, and measure it.

Owns the steering hooks, the `steer` context manager, matched controls (a random direction of the
same norm), and the measurements that say whether a steered continuation moved from domain A
toward domain B at what cost: next-token mass on each domain's vocabulary, an independent
sentence-embedding judge, KL on neutral prompts, and fluency. Every effect is reported beside the
same measurement for a random control and for baseline vectors. Decoding lives in
`analoglock.generation`; the judge in `analoglock.lock.judge`; this module knows nothing of training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.generation import Hook, encode_prompts, generate
from analoglock.hooks import validate_hook
from analoglock.lock.judge import load_judge
from analoglock.tokens import pad_ids

log = logging.getLogger(__name__)

POSITIONS = ("all", "new")


# ---------------------------------------------------------------- hooks


def add_vector_hook(
    vector: Annotated[Tensor, "d_model"], scale: float, positions: str = "all"
) -> Callable:
    """Hook fn adding `scale * vector` to the activation.

    positions="all": at every position. positions="new": only where generation writes new text,
    i.e. the last prompt position (the one that predicts the first new token) and every decode
    step (cached decoding shows the hook one position at a time, x.shape[1] == 1). "new" is meant
    for `generate`; a teacher-forced pass over prompt + continuation would only be steered at its
    last position.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, not {positions!r}")
    delta = scale * vector.detach()
    cache: dict[tuple, Tensor] = {}

    def hook_fn(x: Tensor, hook=None) -> Tensor:
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = delta.to(device=x.device, dtype=x.dtype)
        d = cache[key]
        if positions == "all" or x.shape[1] == 1:
            return x + d
        out = x.clone()
        out[:, -1] = out[:, -1] + d  # prompts are left-padded, so -1 is every row's last token
        return out

    return hook_fn


def apply_map_hook(mapper: torch.nn.Module, alpha: float) -> Callable:
    """Hook fn moving the activation a fraction `alpha` of the way to M(x): x + alpha (M(x) - x)."""

    def hook_fn(x: Tensor, hook=None) -> Tensor:
        p = next(mapper.parameters(), None)
        y = mapper(x.to(p.dtype) if p is not None else x).to(x.dtype)
        return x + alpha * (y - x)

    return hook_fn


@contextmanager
def steer(model, hook: str, fn: Callable) -> Iterator[Any]:
    """Run `model` with `fn` attached at `hook`; the hook is removed on exit, even on error."""
    validate_hook(model, hook)
    with model.hooks(fwd_hooks=[(hook, fn)]):
        yield model


def random_control(vector: Annotated[Tensor, "d_model"], seed: int) -> Annotated[Tensor, "d_model"]:
    """A random direction (seeded, isotropic) with the same norm, dtype and device as `vector`."""
    gen = torch.Generator().manual_seed(int(seed))
    v = vector.detach()
    d = torch.randn(v.shape, generator=gen, dtype=torch.float64)
    d = d * (v.double().norm() / d.norm())
    return d.to(dtype=v.dtype, device=v.device)


# ---------------------------------------------------------------- vocabulary


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


# ---------------------------------------------------------------- measurements


def _prompt_ids(model, prompt: str) -> list[int]:
    """Token ids of one prompt exactly as `generate` feeds it (BOS included)."""
    return encode_prompts(model, [prompt])[0][0].tolist()


def _bos_id(model) -> int:
    """The id that starts a sequence scored without its prompt."""
    tok = model.tokenizer
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def _teacher_forced(
    model, rows: Sequence[Sequence[int]], fwd_hooks: Sequence[Hook], batch_size: int
) -> Iterator[tuple[int, Tensor]]:
    """(row index, float32 log-probs [len, d_vocab]) for each row, right-padded in batches.

    Right padding keeps every real position's logits equal to the row's own unpadded run
    (causal attention never looks ahead at the pads).
    """
    pad = model.tokenizer.pad_token_id
    device = model.cfg.device
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, mask = pad_ids(batch, pad)
        with model.hooks(fwd_hooks=list(fwd_hooks)):
            logits = model(ids.to(device), attention_mask=mask.to(device))
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for i, r in enumerate(batch):
            yield start + i, logp[i, : len(r)]


@torch.no_grad()
def domain_mass(
    model,
    prompts: Sequence[str],
    completions_token_ids: Sequence[Sequence[int]],
    vocab_a: Tensor,
    vocab_b: Tensor,
    fwd_hooks: Sequence[Hook] = (),
    batch_size: int = 16,
) -> Annotated[Tensor, "n_prompts"]:
    """Per prompt: mean next-token probability on B's vocabulary minus on A's, while continuing.

    Teacher-forced over prompt + continuation under `fwd_hooks`; averaged over every distribution
    the model produced while writing the continuation: at the prompt's last token and after each
    continuation token (so an empty continuation still has one).
    """
    if len(prompts) != len(completions_token_ids):
        raise ValueError(
            f"{len(prompts)} prompts but {len(completions_token_ids)} continuations; "
            "give one continuation (token ids) per prompt."
        )
    starts, rows = [], []
    for prompt, cont in zip(prompts, completions_token_ids, strict=True):
        ids = _prompt_ids(model, prompt)
        starts.append(len(ids) - 1)
        rows.append(ids + list(cont))
    out = torch.zeros(len(rows))
    va, vb = vocab_a.long().cpu(), vocab_b.long().cpu()
    for i, logp in _teacher_forced(model, rows, fwd_hooks, batch_size):
        p = logp[starts[i] :].exp()
        out[i] = (p[:, vb].sum(-1) - p[:, va].sum(-1)).mean()
    return out


@torch.no_grad()
def neutral_kl(
    model, neutral_prompts: Sequence[str], fwd_hooks: Sequence[Hook], batch_size: int = 16
) -> float:
    """Mean over prompts and positions of KL(unsteered || steered) next-token distributions.

    On prompts from neither domain this is the collateral damage of steering: 0 means the
    intervention leaves unrelated text alone.
    """
    rows = [_prompt_ids(model, p) for p in neutral_prompts]
    clean = dict(_teacher_forced(model, rows, (), batch_size))
    per_prompt = []
    for i, logq in _teacher_forced(model, rows, fwd_hooks, batch_size):
        logp = clean[i]
        per_prompt.append((logp.exp() * (logp - logq)).sum(-1).mean())
    return float(torch.stack(per_prompt).mean()) if per_prompt else float("nan")


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
    for i, logp in _teacher_forced(model, rows, (), batch_size):
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


# ---------------------------------------------------------------- evaluation


def _mean(x: Tensor) -> float:
    """Mean ignoring NaN (empty continuations), as a float."""
    return float(torch.nanmean(x.double()))


def evaluate_steering(
    model,
    relation_vector: Annotated[Tensor, "d_model"],
    hook: str | Sequence[str],
    prompts: Sequence[str],
    a_refs: Sequence[str],
    b_refs: Sequence[str],
    scales: Sequence[float],
    neutral_prompts: Sequence[str],
    baselines: Mapping[str, Tensor] | None = None,
    max_new_tokens: int = 40,
    n_controls: int = 2,
    seed: int = 0,
    judge=None,
    *,
    vocab: tuple[Tensor, Tensor] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Steer greedy generation with the learned vector at each scale, beside matched controls.

    At every scale the same measurements are taken for the learned vector, for `n_controls`
    random directions of the same norm (averaged), and for each baseline vector at the same
    scale. Shifts are steered minus unsteered: `domain_shift` (B-minus-A vocabulary mass,
    teacher-forced on each arm's own continuations under its own hook), `judge_shift` (the
    sentence judge's B-minus-A score), `neutral_kl` (damage on neutral prompts),
    `fluency_ratio` (perplexity of the continuations alone, steered over unsteered) and
    `diversity_ratio` (distinct bigrams, steered over unsteered: low means looping text).
    `judge` is anything with `domain_score(texts, a_refs, b_refs)`; None loads the shipped one.
    `hook` may be several hook names: every arm then adds its vector at each of them.
    """
    hook_names = [hook] if isinstance(hook, str) else list(hook)
    for name in hook_names:
        validate_hook(model, name)
    scales = [float(s) for s in scales]
    if not scales:
        raise ValueError("scales is empty; give at least one scale, e.g. [0, 4].")
    if not prompts:
        raise ValueError("No prompts to steer.")
    if n_controls < 1:
        raise ValueError("n_controls must be >= 1: every effect is reported beside a control.")
    baselines = dict(baselines or {})
    clash = {"control", "learned", "relation"} & set(baselines)
    if clash:
        raise ValueError(f"Baseline names {sorted(clash)} are reserved; rename them.")
    judge = judge if judge is not None else load_judge()
    vocab_a, vocab_b = vocab if vocab is not None else domain_vocab(model, a_refs, b_refs)
    r = relation_vector.detach().float().cpu()
    arms: dict[str, list[Tensor]] = {
        "learned": [r],
        "control": [random_control(r, seed + k) for k in range(n_controls)],
        **{name: [v.detach().float().cpu()] for name, v in baselines.items()},
    }
    gen_kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)

    base = generate(model, prompts, **gen_kw)
    base_mass = _mean(
        domain_mass(model, prompts, base.new_tokens, vocab_a, vocab_b, (), batch_size)
    )
    base_judge = _mean(judge.domain_score(base.completions, a_refs, b_refs))
    base_ppl = _mean(continuation_perplexity(model, base.new_tokens, batch_size))
    base_distinct = _mean(distinct_n(base.new_tokens))

    def measure(vector: Tensor, scale: float) -> tuple[dict[str, float], list[str]]:
        hooks = [(name, add_vector_hook(vector, scale)) for name in hook_names]
        gen = generate(model, prompts, fwd_hooks=hooks, **gen_kw)
        mass = domain_mass(model, prompts, gen.new_tokens, vocab_a, vocab_b, hooks, batch_size)
        score = judge.domain_score(gen.completions, a_refs, b_refs)
        ppl = continuation_perplexity(model, gen.new_tokens, batch_size)
        metrics = {
            "domain_shift": _mean(mass) - base_mass,
            "judge_shift": _mean(score) - base_judge,
            "neutral_kl": neutral_kl(model, neutral_prompts, hooks, batch_size),
            "fluency_ratio": _mean(ppl) / base_ppl if base_ppl > 0 else float("nan"),
            "diversity_ratio": _mean(distinct_n(gen.new_tokens)) / base_distinct
            if base_distinct > 0
            else float("nan"),
        }
        return metrics, gen.completions

    results, texts_at = [], {}
    top = max(scales, key=abs)
    for scale in tqdm(scales, desc="steer", disable=not progress):
        row: dict[str, float] = {"scale": scale}
        for arm, vectors in arms.items():
            per = [measure(v, scale) for v in vectors]
            prefix = "" if arm == "learned" else f"{arm}_"
            for key in per[0][0]:
                row[prefix + key] = sum(m[key] for m, _ in per) / len(per)
            if scale == top:
                texts_at[arm] = per[0][1]  # the first control seed's text stands for the controls
        results.append(row)
        log.info("scale %g: %s", scale, {k: round(v, 4) for k, v in row.items()})

    generations = []
    for i, prompt in enumerate(prompts):
        item = {"prompt": prompt, "before": base.completions[i], "after": texts_at["learned"][i]}
        item.update({arm: texts_at[arm][i] for arm in arms if arm != "learned"})
        generations.append(item)
    tok = model.tokenizer
    return {
        "hook": ", ".join(hook_names),
        "scales": scales,
        "generation_scale": top,
        "max_new_tokens": max_new_tokens,
        "n_controls": n_controls,
        "seed": seed,
        "norms": {arm: float(v[0].norm()) for arm, v in arms.items()},
        "unsteered": {
            "domain_mass": base_mass,
            "judge_score": base_judge,
            "perplexity": base_ppl,
            "distinct2": base_distinct,
        },
        "vocab": {
            "a": [tok.decode([int(i)]).strip() for i in vocab_a[:25]],
            "b": [tok.decode([int(i)]).strip() for i in vocab_b[:25]],
        },
        "generations": generations,
        "results": results,
    }


# ---------------------------------------------------------------- plot


def plot_steering(results: Sequence[Mapping[str, float]] | Mapping[str, Any], path_html):
    """Effect vs scale (judge shift per arm) beside fluency ratio; written as standalone HTML.

    Accepts `evaluate_steering`'s output or its "results" list. Returns the plotly figure so a
    caller can also log it (wandb accepts plotly figures).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = list(results["results"] if isinstance(results, Mapping) else results)
    scales = [r["scale"] for r in rows]
    arms = [
        k.removesuffix("judge_shift").removesuffix("_")
        for k in rows[0]
        if k.endswith("judge_shift")
    ]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("Judge shift toward B (steered - unsteered)", "Fluency (perplexity ratio)"),
    )
    for arm in arms:
        prefix = f"{arm}_" if arm else ""
        name = arm or "learned"
        dash = "dot" if arm == "control" else None
        for col, key in ((1, "judge_shift"), (2, "fluency_ratio")):
            fig.add_trace(
                go.Scatter(
                    x=scales,
                    y=[r.get(prefix + key) for r in rows],
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    line={"dash": dash},
                ),
                row=1,
                col=col,
            )
    fig.add_hline(y=0, line_color="grey", line_width=1, row=1, col=1)
    fig.add_hline(y=1, line_color="grey", line_width=1, row=1, col=2)
    fig.update_xaxes(title_text="scale")
    fig.update_yaxes(title_text="cos to B - cos to A", row=1, col=1)
    fig.update_yaxes(title_text="ppl steered / unsteered", row=1, col=2)
    path = Path(path_html)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    os.replace(tmp, path)
    return fig


__all__ = [
    "add_vector_hook",
    "apply_map_hook",
    "continuation_perplexity",
    "distinct_n",
    "domain_mass",
    "domain_vocab",
    "evaluate_steering",
    "neutral_kl",
    "plot_steering",
    "random_control",
    "steer",
]
