"""Working backwards from a target token: which upstream features drive its logit, and how.

Owns, for one target token and a basis U at hook h1 (the segment h1 -> last block's resid_post,
the downstream "basis" `TokenLogits([target])`, ablation at every non-BOS position, the logit
read at each prompt's last position):

- `target_token_id` (refuses targets that are not one token, naming the pieces) and
  `producing_prompts` (keeps prompts whose greedy next token is the target, reports the rest);
- `rank_upstream`: drive[b, i] = -A_b[i] (attribution of ablating feature i to the target logit
  on prompt b; positive = the feature raises the logit), pooled over prompts, and the top ones
  checked by exact ablation (`exact_effects`, `agreement`) beside random-direction controls;
- `group_ablation`: target logit / probability after ablating whole groups of features at once
  (the pair {i, j} is the delta -(a_i d_i + a_j d_j) in one rerun);
- `and_or`: single and pairwise ablations of the top features, classified AND-like (some single
  ablation drops p(target) by more than `kill`), OR-like (no single does, some pair does) or
  distributed (neither), beside random feature pairs;
- `alternate_routes`: prompts clustered by the Jaccard overlap of their top-k feature sets;
  for groups with disjoint top features, principal angles between the SVD subspaces of their
  h1 activations, beside random subspaces and a shuffled-groups control.

Knows nothing of CLIs or reports.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.patching.attribution import agreement, attribution_effects
from analoglock.patching.exact import clean_runs, coefficients, exact_effects
from analoglock.patching.interventions import Ablate
from analoglock.patching.prompts import build_prompts
from analoglock.patching.readouts import TokenLogits
from analoglock.patching.segment import CleanRun, Segment
from analoglock.positions import AllTokens, LastToken
from analoglock.stats import random_unit_directions

log = logging.getLogger(__name__)

KILL = 0.5  # a feature (group) "kills" the target when ablating it removes > 50% of p(target)


class TraceInputError(ValueError):
    """A target, prompt set or basis that cannot be traced as asked."""


def target_token_id(tokenizer, target: str) -> int:
    """The id of a single-token target; otherwise say which tokens it splits into."""
    if not target:
        raise TraceInputError("The target token is empty.")
    ids = tokenizer.encode(target, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        hint = (
            ""
            if target.startswith(" ")
            else f" (mid-sentence words usually carry a space: {' ' + target!r})"
        )
        raise TraceInputError(
            f"Target {target!r} is {len(ids)} tokens {pieces}, not one; give a single token{hint}."
        )
    return int(ids[0])


@torch.no_grad()
def next_token_logits(model, clean: CleanRun) -> Annotated[Tensor, "d_vocab"]:
    """The model's next-token logits at the prompt's last position, from the clean final residual."""
    return model.unembed(model.ln_final(clean.x2[-1:][None]))[0, 0].float()


@dataclass
class Traced:
    """Prompts that produce the target, their clean runs, and the ones dropped (with why)."""

    segment: Segment
    target: int
    prompts: list  # Prompt
    cleans: list[CleanRun]
    dropped: list[dict[str, Any]]
    clean_logit: Tensor  # [n_prompts]
    clean_prob: Tensor  # [n_prompts]


def producing_prompts(model, basis, docs, target: int, max_length: int = 256, progress: bool = True) -> Traced:  # fmt: skip
    """Keep the prompts whose greedy next token is `target` (ablation everywhere, readout last)."""
    if not docs:
        raise TraceInputError("The prompt set is empty: give at least one prompt.")
    seg = Segment(model, basis.hook, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    prompts = build_prompts(model, docs, AllTokens(), LastToken(), max_length=max_length)
    cleans = clean_runs(seg, prompts, progress=progress)
    keep, dropped, logit, prob = [], [], [], []
    decode = model.tokenizer.decode
    for k, (p, c) in enumerate(zip(prompts, cleans, strict=True)):
        z = next_token_logits(model, c)
        greedy = int(z.argmax())
        if greedy == target:
            keep.append(k)
            logit.append(float(z[target]))
            prob.append(float(z.softmax(-1)[target]))
        else:
            dropped.append({"id": p.id, "greedy": decode([greedy]), "p_target": float(z.softmax(-1)[target])})  # fmt: skip
    if dropped:
        log.warning("Dropped %d of %d prompts that do not produce %r: %s", len(dropped), len(prompts), decode([target]), [(d["id"], d["greedy"]) for d in dropped])  # fmt: skip
    if not keep:
        raise TraceInputError(
            f"None of the {len(prompts)} prompts has {decode([target])!r} as its greedy next token "
            f"(they give {sorted({d['greedy'] for d in dropped})}); pick another target or prompts."
        )
    return Traced(
        seg,
        target,
        [prompts[k] for k in keep],
        [cleans[k] for k in keep],
        dropped,
        torch.tensor(logit),
        torch.tensor(prob),
    )


def per_prompt_drive(traced: Traced, basis, progress: bool = True) -> Annotated[Tensor, "n_prompts n_features"]:  # fmt: skip
    """drive[b, i]: first-order drop of the target logit when feature i is ablated on prompt b."""
    readout = TokenLogits(traced.segment.model, [traced.target])
    rows = []
    for c in tqdm(traced.cleans, desc="attribution", unit="prompt", disable=not progress):
        eff = attribution_effects(traced.segment, [c], basis, readout, Ablate(1.0), control=False, progress=False)  # fmt: skip
        rows.append(-eff.effect[:, 0])
    return torch.stack(rows)


def rank_upstream(
    traced: Traced, basis, k: int = 10, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Rank features by mean drive; check the top k (and k random others) by exact ablation."""
    drive = per_prompt_drive(traced, basis, progress)
    pooled = drive.mean(0)
    k = min(int(k), basis.n_features)
    top = pooled.topk(k).indices
    rest = torch.tensor([i for i in range(basis.n_features) if i not in set(top.tolist())])
    gen = torch.Generator().manual_seed(int(seed))
    others = rest[torch.randperm(len(rest), generator=gen)[:k]] if len(rest) else rest
    rows = torch.cat([top, others])
    readout = TokenLogits(traced.segment.model, [traced.target])
    ex = exact_effects(traced.segment, traced.cleans, basis, readout, Ablate(1.0), upstream_ids=rows, seed=seed, progress=progress)  # fmt: skip
    at = attribution_effects(traced.segment, traced.cleans, basis, readout, Ablate(1.0), upstream_ids=rows, seed=seed, progress=False)  # fmt: skip
    exact_drive, exact_ctrl = -ex.effect[:, 0], -ex.control[:, 0]
    features = [
        {
            "feature": int(f),
            "attribution": round(float(pooled[f]), 5),
            "exact": round(float(exact_drive[r]), 5),
            "exact_control": round(float(exact_ctrl[r]), 5),
            "prompts_in_topk": int((drive.topk(k, dim=1).indices == f).any(1).sum()),
        }
        for r, f in enumerate(top.tolist())
    ]
    return {
        "drive": drive,
        "top": top,
        "features": features,
        "checked": rows.tolist(),  # the top k and k random others, in the agreement's order
        "agreement": agreement(ex, at, k=len(top)),
        "control_abs_mean": round(float(exact_ctrl.abs().mean()), 5),
        "random_features_exact_abs_mean": round(float(exact_drive[len(top) :].abs().mean()), 5)
        if len(others)
        else None,
        "exact_seconds": round(ex.seconds, 2),
    }


@torch.no_grad()
def group_ablation(
    traced: Traced,
    basis,
    groups: Sequence[Sequence[int]],
    directions: Tensor | None = None,
) -> tuple[Annotated[Tensor, "n_groups n_prompts"], Annotated[Tensor, "n_groups n_prompts"]]:
    """(target logit, target probability) after ablating each group's features together.

    `directions` replaces the basis's directions in the delta (the random-direction control)."""
    model, seg = traced.segment.model, traced.segment
    dirs = (basis.directions if directions is None else directions).detach().float()
    logit = torch.zeros(len(groups), len(traced.cleans))
    prob = torch.zeros_like(logit)
    for b, clean in enumerate(traced.cleans):
        c = coefficients(Ablate(1.0), basis, clean).float()  # [pos, n_features]
        deltas = torch.stack(
            [
                c[:, list(g)] @ dirs[list(g)] if len(g) else torch.zeros_like(clean.x1)
                for g in groups
            ]  # fmt: skip
        )
        for s in range(0, len(groups), 32):
            x2 = seg.run(clean, deltas[s : s + 32])
            z = model.unembed(model.ln_final(x2[:, -1:]))[:, 0].float()
            logit[s : s + 32, b] = z[:, traced.target]
            prob[s : s + 32, b] = z.softmax(-1)[:, traced.target]
    return logit, prob


def classify(
    single: dict[int, float], pairs: dict[tuple[int, int], float], kill: float = KILL
) -> dict[str, Any]:
    """AND-like if some single ablation's drop exceeds `kill`; OR-like if none does but a pair does."""
    killers = sorted(i for i, d in single.items() if d > kill)
    pair_killers = sorted(p for p, d in pairs.items() if d > kill)
    if killers:
        kind = "AND-like"
    elif pair_killers:
        kind = "OR-like"
    else:
        kind = "distributed"
    return {"class": kind, "single_killers": killers, "pair_killers": [list(p) for p in pair_killers], "kill": kill}  # fmt: skip


def and_or(
    traced: Traced,
    basis,
    top: Sequence[int],
    n_random_pairs: int = 20,
    kill: float = KILL,
    seed: int = 0,
) -> dict[str, Any]:
    """Single and pairwise ablations of `top` (drops of p(target), mean over prompts), classified."""
    top = [int(i) for i in top]
    pairs = list(itertools.combinations(top, 2))
    rng = random.Random(seed)
    pool = [i for i in range(basis.n_features) if i not in set(top)]
    rand_pairs = [tuple(rng.sample(pool, 2)) for _ in range(n_random_pairs)] if len(pool) >= 2 else []  # fmt: skip
    groups = [[], *[[i] for i in top], *[list(p) for p in pairs], *[list(p) for p in rand_pairs]]
    logit, prob = group_ablation(traced, basis, groups)
    p0, z0 = prob[0], logit[0]
    drop = (1 - prob / p0).mean(1)  # mean over prompts of the relative fall of p(target)
    dlogit = (logit - z0).mean(1)
    n1, n2 = 1 + len(top), 1 + len(top) + len(pairs)
    single = {i: float(drop[1 + k]) for k, i in enumerate(top)}
    pair = {p: float(drop[n1 + k]) for k, p in enumerate(pairs)}
    rand = drop[n2:]
    out = classify(single, pair, kill)
    per_prompt = [
        classify(
            {i: float(1 - prob[1 + k, b] / p0[b]) for k, i in enumerate(top)},
            {p: float(1 - prob[n1 + k, b] / p0[b]) for k, p in enumerate(pairs)},
            kill,
        )["class"]  # fmt: skip
        for b in range(prob.shape[1])
    ]
    return {
        **out,
        "per_prompt_class": {c: per_prompt.count(c) for c in sorted(set(per_prompt))},
        "clean_prob_mean": round(float(p0.mean()), 5),
        "single": [
            {"feature": i, "drop": round(d, 4), "dlogit": round(float(dlogit[1 + k]), 4)}
            for k, (i, d) in enumerate(single.items())
        ],  # fmt: skip
        "pairs": [
            {"features": list(p), "drop": round(d, 4), "dlogit": round(float(dlogit[n1 + k]), 4)}
            for k, (p, d) in enumerate(pair.items())
        ],  # fmt: skip
        "random_pairs": {
            "n": len(rand_pairs),
            "drop_mean": round(float(rand.mean()), 4) if len(rand) else None,
            "drop_max": round(float(rand.max()), 4) if len(rand) else None,
            "killing_fraction": round(float((rand > kill).double().mean()), 4)
            if len(rand)
            else None,  # fmt: skip
        },
    }


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (0 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 0.0


def route_groups(topsets: Sequence[set], min_jaccard: float = 0.3) -> list[list[int]]:
    """Prompts linked when their top-feature sets overlap by >= min_jaccard; connected components."""
    import networkx as nx  # a torch dependency, so always installed with it

    g = nx.Graph()
    g.add_nodes_from(range(len(topsets)))
    for a, b in itertools.combinations(range(len(topsets)), 2):
        if jaccard(topsets[a], topsets[b]) >= min_jaccard:
            g.add_edge(a, b)
    return sorted((sorted(c) for c in nx.connected_components(g)), key=lambda c: (-len(c), c))


def subspace(rows: Annotated[Tensor, "n d"], rank: int) -> Annotated[Tensor, "r d"]:
    """Orthonormal basis of the top-`rank` right singular vectors of `rows`."""
    _, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    r = min(int(rank), int((s > s[0] * 1e-6).sum()) if len(s) else 0)
    return vh[:r]


def principal_cosines(q1: Tensor, q2: Tensor) -> Tensor:
    """Cosines of the principal angles between two row-orthonormal subspaces, largest first."""
    if len(q1) == 0 or len(q2) == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.linalg.svdvals(q1.double() @ q2.double().T).clamp(max=1.0)


def random_subspace(d: int, r: int, gen: torch.Generator) -> Tensor:
    """A uniformly random r-dimensional subspace of R^d (orthonormal rows)."""
    q, _ = torch.linalg.qr(random_unit_directions(r, d, gen).T)  # spans of Gaussians: uniform
    return q.T


def driving_rows(cleans: Sequence[CleanRun], idx: Sequence[int], mean: Tensor) -> Tensor:
    """h1 activations at the intervention positions of prompts idx, centred on the set's mean."""
    return torch.cat([cleans[b].x1[cleans[b].intervene] for b in idx]).double() - mean


def alternate_routes(
    traced: Traced,
    drive: Annotated[Tensor, "n_prompts n_features"],
    k: int = 5,
    min_jaccard: float = 0.3,
    rank: int = 4,
    n_control: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Group prompts by top-k drivers; principal angles between groups with disjoint top features."""
    top = drive.topk(min(k, drive.shape[1]), dim=1).indices
    topsets = [set(t.tolist()) for t in top]
    groups = route_groups(topsets, min_jaccard)
    pooled = [set(drive[g].mean(0).topk(min(k, drive.shape[1])).indices.tolist()) for g in groups]
    cleans = traced.cleans
    mean = torch.cat([c.x1[c.intervene] for c in cleans]).double().mean(0)
    gen = torch.Generator().manual_seed(int(seed))
    comparisons = []
    for a, b in itertools.combinations(range(len(groups)), 2):
        if pooled[a] & pooled[b]:
            continue
        qa = subspace(driving_rows(cleans, groups[a], mean), rank)
        qb = subspace(driving_rows(cleans, groups[b], mean), rank)
        cos = principal_cosines(qa, qb)
        d = qa.shape[1]
        rand = torch.stack([principal_cosines(qa, random_subspace(d, len(qb), gen)).mean() for _ in range(n_control)])  # fmt: skip
        union = groups[a] + groups[b]
        shuffled = []
        for _ in range(n_control):  # same group sizes, prompts reassigned at random
            perm = [union[i] for i in torch.randperm(len(union), generator=gen).tolist()]
            sa, sb = perm[: len(groups[a])], perm[len(groups[a]) :]
            shuffled.append(float(principal_cosines(subspace(driving_rows(cleans, sa, mean), rank), subspace(driving_rows(cleans, sb, mean), rank)).mean()))  # fmt: skip
        comparisons.append(
            {
                "groups": [a, b],
                "top_features": [sorted(pooled[a]), sorted(pooled[b])],
                "cosines": [round(float(x), 4) for x in cos],
                "mean_cosine": round(float(cos.mean()), 4) if len(cos) else None,
                "random_subspace_mean_cosine": round(float(rand.mean()), 4),
                "shuffled_groups_mean_cosine": round(sum(shuffled) / len(shuffled), 4),
            }
        )
    ids = [p.id for p in traced.prompts]
    return {
        "k": k,
        "min_jaccard": min_jaccard,
        "rank": rank,
        "groups": [
            {"prompts": [ids[i] for i in g], "top_features": sorted(pooled[n])}
            for n, g in enumerate(groups)
        ],  # fmt: skip
        "disjoint_pairs": comparisons,
        "prompt_topk": {ids[b]: sorted(s) for b, s in enumerate(topsets)},
    }


def trace_backwards(
    model,
    basis,
    docs,
    target: str,
    k: int = 8,
    and_or_k: int = 5,
    route_k: int = 5,
    min_jaccard: float = 0.3,
    kill: float = KILL,
    seed: int = 0,
    max_length: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole backwards analysis for one target: ranking with exact check, AND/OR, routes."""
    tid = target_token_id(model.tokenizer, target)
    traced = producing_prompts(model, basis, docs, tid, max_length, progress)
    ranked = rank_upstream(traced, basis, k, seed, progress)
    andor = and_or(traced, basis, ranked["top"][:and_or_k].tolist(), kill=kill, seed=seed)
    routes = alternate_routes(traced, ranked["drive"], route_k, min_jaccard, seed=seed)
    return {
        "target": target,
        "target_id": tid,
        "hook": basis.hook,
        "n_prompts": len(traced.prompts),
        "prompts": [p.id for p in traced.prompts],
        "dropped": traced.dropped,
        "clean_prob": [round(float(p), 4) for p in traced.clean_prob],
        "ranked": {k2: v for k2, v in ranked.items() if k2 not in ("drive", "top")},
        "and_or": andor,
        "routes": routes,
    }


__all__ = [
    "KILL",
    "TraceInputError",
    "Traced",
    "alternate_routes",
    "and_or",
    "classify",
    "group_ablation",
    "jaccard",
    "principal_cosines",
    "producing_prompts",
    "rank_upstream",
    "route_groups",
    "target_token_id",
    "trace_backwards",
]
