"""Chains across tokens: feature -> promoted token -> feature at the next position, and cycles.

Owns, for one basis U at hook h:

- feature -> token edges: the direct logit effect of each direction, d_i @ (g * W_U) (g the final
  norm's gain, `analoglock.unembed.unembedding`), beside random directions of equal norm; and the
  same tokens measured by ablation (`exact_effects` with a `TokenLogits` readout: promotion =
  minus the logit change when a_i d_i is removed), beside the engine's random-direction control;
- token -> feature edges: z[t, i] = (mean code of feature i at the position of token t appended
  to neutral contexts - mean over random control tokens appended the same way) / their std;
- `chain_graph`: both edge kinds kept above their controls, simple cycles (networkx, a torch
  dependency), and F -> t -> F chains ranked by their weaker link (in units of its threshold);
- `validate_chain`: on held-out contexts, boosting feature A raises p(t) (vs a random direction)
  and appending t raises feature B (vs control tokens).

Knows nothing of CLIs or reports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from torch import Tensor

from analoglock.patching.exact import exact_effects
from analoglock.patching.interventions import Ablate, random_directions
from analoglock.patching.readouts import TokenLogits
from analoglock.patching.segment import Segment
from analoglock.unembed import unembedding

log = logging.getLogger(__name__)

# Neutral contexts a token is appended to (edges), and held-out ones (validation).
NEUTRAL_CONTEXTS = (
    "The",
    "I think that",
    "Here is a list of",
    "She looked at the",
    "In the morning, we",
    "This is what happened:",
    "He wrote down",
    "They said",
)
HELD_OUT_CONTEXTS = (
    "Then the",
    "We saw",
    "It was a",
    "My friend told me about",
)
CONTROL_QUANTILE = 0.99  # an edge must beat this quantile of its control distribution


def direct_logit_effect(model, directions: Annotated[Tensor, "n d_model"]) -> Annotated[Tensor, "n d_vocab"]:  # fmt: skip
    """d_i @ (g * W_U): each direction's logits through the final norm's gain and the unembedding."""
    return directions.detach().float().cpu() @ unembedding(model).cpu()


def promoted(model, directions: Tensor, k: int = 3, seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """(top-k token ids [n, k], their direct effects [n, k], control floor from random directions)."""
    dle = direct_logit_effect(model, directions)
    vals, ids = dle.topk(k, dim=-1)
    ctrl = direct_logit_effect(model, random_directions(directions.detach().float().cpu(), seed))
    floor = float(torch.quantile(ctrl.topk(k, dim=-1).values.flatten().double(), CONTROL_QUANTILE))
    return ids, vals, floor


def measured_promotion(
    segment: Segment,
    cleans,
    basis,
    token_ids: Sequence[int],
    feature_ids: Sequence[int],
    seed: int = 0,
    progress: bool = True,  # fmt: skip
) -> tuple[Tensor, Tensor]:
    """(promotion [n_feat, n_tok], control) by ablation: minus the token logits' mean change."""
    readout = TokenLogits(segment.model, list(token_ids))
    eff = exact_effects(segment, cleans, basis, readout, Ablate(1.0), upstream_ids=list(feature_ids), seed=seed, progress=progress)  # fmt: skip
    return -eff.effect, -eff.control


def context_ids(model, texts: Sequence[str]) -> list[Tensor]:
    """Each context tokenized like `model.to_tokens` (BOS first)."""
    return [model.to_tokens(t)[0].cpu() for t in texts]


@torch.no_grad()
def codes_after(
    model, basis, contexts: Sequence[Tensor], token_ids: Sequence[int], batch: int = 128
) -> Annotated[Tensor, "n_contexts n_tokens n_features"]:
    """Codes of the basis at the position of each token appended to each context."""
    layer = int(basis.hook.split(".")[1])
    stop = layer + 1 if layer + 1 < model.cfg.n_layers else None
    tok = torch.tensor(list(token_ids), dtype=torch.long)
    out = torch.zeros(len(contexts), len(tok), basis.n_features)
    got: dict[str, Tensor] = {}

    def grab(x: Tensor, hook=None) -> None:
        got["x"] = x[:, -1].detach()

    for c, ctx in enumerate(contexts):
        for s in range(0, len(tok), batch):
            t = tok[s : s + batch]
            ids = torch.cat([ctx.expand(len(t), -1), t[:, None]], dim=1)
            with model.hooks(fwd_hooks=[(basis.hook, grab)]):
                model(ids.to(model.cfg.device), stop_at_layer=stop, return_type=None)
            out[c, s : s + len(t)] = basis.encode(got["x"].float()).cpu()
    return out


def control_tokens(model, n: int, seed: int = 0, exclude: Sequence[int] = ()) -> list[int]:
    """n random vocabulary ids (seeded) that decode to text starting with a space and a letter."""
    gen = torch.Generator().manual_seed(int(seed))
    skip, out = set(exclude), []
    for i in torch.randperm(model.cfg.d_vocab, generator=gen).tolist():
        s = model.tokenizer.decode([i])
        if i not in skip and len(s) > 2 and s[0] == " " and s[1:].isalpha():
            out.append(i)
            if len(out) == n:
                break
    return out


def token_feature_z(
    model, basis, contexts: Sequence[Tensor], token_ids: Sequence[int], controls: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """(z [n_tok, n_feat] of each token vs the control tokens, leave-one-out z of each control)."""
    codes = codes_after(model, basis, contexts, list(token_ids) + list(controls)).mean(0)
    tok, ctl = codes[: len(token_ids)], codes[len(token_ids) :]
    mu, sd = ctl.mean(0), ctl.std(0).clamp_min(1e-6)
    z = (tok - mu) / sd
    n = len(ctl)
    loo_mu = (ctl.sum(0, keepdim=True) - ctl) / (n - 1)
    loo_sd = torch.stack([torch.cat([ctl[:i], ctl[i + 1 :]]).std(0) for i in range(n)]).clamp_min(1e-6)  # fmt: skip
    return z, (ctl - loo_mu) / loo_sd


def simple_cycles(edges: Sequence[tuple[str, str]], max_len: int = 6) -> list[list[str]]:
    """Simple directed cycles of at most max_len nodes (networkx), shortest first."""
    import networkx as nx  # a torch dependency, so always installed with it

    g = nx.DiGraph(list(edges))
    cycles = []
    for c in nx.simple_cycles(g, length_bound=max_len):
        k = c.index(min(c))  # rotate so equal cycles print alike, smallest node first
        cycles.append(c[k:] + c[:k])
    return sorted(cycles, key=lambda c: (len(c), c))


def chain_graph(
    model,
    segment: Segment,
    cleans,
    basis,
    features: Sequence[int],
    k_tokens: int = 3,
    n_controls: int = 64,
    z_min: float = 3.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Feature -> token -> feature edges above controls, chains and cycles."""
    features = [int(f) for f in features]
    dirs = basis.directions.detach().float()[features]
    ids, vals, direct_floor = promoted(model, dirs, k_tokens, seed)
    tokens = sorted(set(ids.flatten().tolist()))
    col = {t: j for j, t in enumerate(tokens)}
    meas, meas_ctrl = measured_promotion(segment, cleans, basis, tokens, features, seed, progress)
    meas_floor = float(torch.quantile(meas_ctrl.abs().flatten().double(), CONTROL_QUANTILE))
    decode = model.tokenizer.decode
    ft = []
    for r, f in enumerate(features):
        for t, v in zip(ids[r].tolist(), vals[r].tolist(), strict=True):
            m = float(meas[r, col[t]])
            ft.append({"feature": f, "token": t, "text": decode([t]), "direct": round(v, 4), "measured": round(m, 5), "measured_control": round(float(meas_ctrl[r, col[t]]), 5), "kept": v > direct_floor and m > meas_floor})  # fmt: skip
    kept_tokens = sorted({e["token"] for e in ft if e["kept"]})
    controls = control_tokens(model, n_controls, seed, exclude=tokens)
    ctx = context_ids(model, NEUTRAL_CONTEXTS)
    tf = []
    z_floor = z_min
    if kept_tokens:
        z, z_ctrl = token_feature_z(model, basis, ctx, kept_tokens, controls)
        z_floor = max(z_min, float(torch.quantile(z_ctrl[:, features].abs().flatten().double(), CONTROL_QUANTILE)))  # fmt: skip
        for a, t in enumerate(kept_tokens):
            for f in features:
                if float(z[a, f]) > z_floor:
                    tf.append({"token": t, "text": decode([t]), "feature": f, "z": round(float(z[a, f]), 3)})  # fmt: skip
    edges = [(f"F{e['feature']}", f"T{e['token']}") for e in ft if e["kept"]]
    edges += [(f"T{e['token']}", f"F{e['feature']}") for e in tf]
    strength_ft = {(e["feature"], e["token"]): e["measured"] / meas_floor for e in ft if e["kept"]}  # fmt: skip
    chains = []
    for e in tf:
        for (fa, t), s1 in strength_ft.items():
            if t == e["token"]:
                s2 = e["z"] / z_floor
                chains.append({"source": fa, "token": t, "text": e["text"], "target": e["feature"], "promotion_over_floor": round(s1, 3), "z_over_floor": round(s2, 3), "strength": round(min(s1, s2), 3)})  # fmt: skip
    chains.sort(key=lambda c: -c["strength"])
    return {
        "hook": basis.hook,
        "features": features,
        "direct_floor": round(direct_floor, 4),
        "measured_floor": round(meas_floor, 6),
        "z_floor": round(z_floor, 3),
        "n_control_tokens": len(controls),
        "feature_token": ft,
        "token_feature": tf,
        "chains": chains,
        "cycles": simple_cycles(edges),
        "control_token_ids": controls,
    }


@torch.no_grad()
def validate_chain(
    model, basis, chain: dict[str, Any], controls: Sequence[int], boost: float = 4.0, seed: int = 0
) -> dict[str, Any]:
    """Held-out check of one chain A -> t -> B: boosting A raises p(t); appending t raises B."""
    a, t, b = int(chain["source"]), int(chain["token"]), int(chain["target"])
    ctx = context_ids(model, HELD_OUT_CONTEXTS)
    d = basis.directions.detach().float()[a]
    r = random_directions(d[None], seed)[0]
    dp, dp_ctrl = [], []
    for ids in ctx:
        base = _logprob_with(model, basis.hook, ids, None, t)
        scale = boost * float(_resid_norm(model, basis.hook, ids)) / float(d.norm())
        dp.append(_logprob_with(model, basis.hook, ids, scale * d, t) - base)
        dp_ctrl.append(_logprob_with(model, basis.hook, ids, scale * r, t) - base)
    codes = codes_after(model, basis, ctx, [t, *controls])[:, :, b].mean(0)
    return {
        "source": a,
        "token": t,
        "target": b,
        "boost_in_resid_norms": boost,
        "dlogp_token_boost": round(sum(dp) / len(dp), 4),
        "dlogp_token_random_direction": round(sum(dp_ctrl) / len(dp_ctrl), 4),
        "target_code_after_token": round(float(codes[0]), 4),
        "target_code_after_controls_mean": round(float(codes[1:].mean()), 4),
        "target_code_after_controls_std": round(float(codes[1:].std()), 4),
        "z": round(float((codes[0] - codes[1:].mean()) / codes[1:].std().clamp_min(1e-6)), 3),
        "n_contexts": len(ctx),
    }


def _resid_norm(model, hook: str, ids: Tensor) -> Tensor:
    """Norm of the residual at the last position (to scale a boost in natural units)."""
    got: dict[str, Tensor] = {}

    def grab(x: Tensor, hook=None) -> None:
        got["x"] = x[0, -1].detach()

    with model.hooks(fwd_hooks=[(hook, grab)]):
        model(ids[None].to(model.cfg.device), return_type=None)
    return got["x"].norm()


def _logprob_with(model, hook: str, ids: Tensor, add: Tensor | None, token: int) -> float:
    """log p(token) at the last position with `add` added to the hook's last position."""

    def edit(x: Tensor, hook=None) -> Tensor:
        x = x.clone()
        x[:, -1] += add.to(x)
        return x

    hooks = [] if add is None else [(hook, edit)]
    with model.hooks(fwd_hooks=hooks):
        logits = model(ids[None].to(model.cfg.device))
    return float(logits[0, -1].float().log_softmax(-1)[token])


def trace_chains(
    model,
    basis,
    docs,
    n_features: int = 16,
    k_tokens: int = 3,
    n_controls: int = 64,
    z_min: float = 3.0,
    seed: int = 0,
    max_length: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole chains analysis on the most active features of `basis` over the prompts."""
    from analoglock.patching.exact import clean_runs
    from analoglock.patching.prompts import build_prompts

    if not docs:
        raise ValueError("The prompt set is empty: give at least one prompt.")
    seg = Segment(model, basis.hook, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    cleans = clean_runs(seg, build_prompts(model, docs, max_length=max_length), progress)
    with torch.no_grad():
        act = torch.cat([basis.encode(c.x1)[c.intervene] for c in cleans]).abs().mean(0)
    feats = act.topk(min(int(n_features), basis.n_features)).indices.tolist()
    graph = chain_graph(model, seg, cleans, basis, feats, k_tokens, n_controls, z_min, seed, progress)  # fmt: skip
    graph["validation"] = (
        validate_chain(model, basis, graph["chains"][0], graph["control_token_ids"], seed=seed)
        if graph["chains"]
        else None
    )
    graph["n_prompts"] = len(cleans)
    return graph


__all__ = [
    "NEUTRAL_CONTEXTS",
    "chain_graph",
    "codes_after",
    "control_tokens",
    "direct_logit_effect",
    "measured_promotion",
    "promoted",
    "simple_cycles",
    "token_feature_z",
    "trace_chains",
    "validate_chain",
]
