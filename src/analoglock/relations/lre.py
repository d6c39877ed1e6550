"""Relations as operators: linear relational embeddings (Hernandez et al., ICLR 2024) beside
baselines, scored by faithfulness and causality on the benchmark's relations.

Owns the protocol for one relation: check its samples; pick `n_train` samples the model answers
correctly in context (each with a few-shot prompt of the others) and keep the held-out samples it
answers correctly after those examples; at each subject layer fit the LRE (W = mean Jacobian of
z with respect to the subject state over the train prompts, b = mean of z - W h; z = beta W h + b,
at full rank and at each rank of the sweep) and the baselines of lre_ops on the same train pairs;
score faithfulness (the operator's output, decoded through the final norm and unembedding, has
the object's first token on top: over the vocabulary, and among the relation's objects) and
causality (editing the subject state by the operator's inverse toward another held-out sample's
z makes the model prefer that sample's object; beside random edits of the same norm), each with a
bootstrap interval over samples; then the tables over relations and relation kinds. The runner
is `run(cfg, ctx)` (analysis "lre"). Knows nothing of drawing (reports/lre.py).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from analoglock.hooks import hook_layer
from analoglock.relations.config import LREConfig, settings
from analoglock.relations.context import RelationsContext
from analoglock.relations.lre_data import (
    CheckedSamples,
    PromptIds,
    Relation,
    RelationDataError,
    RelationSample,
    available_relations,
    check_samples,
    encode_prompt,
    load_relation,
    make_prompt,
    relation_path,
)
from analoglock.relations.lre_model import SubjectFunction, decode, edited_logits, prompt_states
from analoglock.relations.lre_ops import (
    BASELINES,
    class_mean_edit,
    fit_baselines,
    lre_from_weight,
    same_norm_random,
)
from analoglock.stats import bootstrap_mean
from analoglock.tokens import prepend_bos_id

log = logging.getLogger(__name__)

EDIT_BASELINES = ("identity", "linreg", "meandiff", "lock")  # translation edits as identity does


@dataclass
class Split:
    """Train and held-out samples of one relation with their prompts, object tokens and states."""

    train: list[RelationSample]
    test: list[RelationSample]
    train_obj: Tensor
    test_obj: Tensor
    train_prompts: list[PromptIds]
    test_prompts: list[PromptIds]
    H_train: dict[int, Tensor]
    Z_train: Tensor
    H_test: dict[int, Tensor]
    Z_test: Tensor
    counts: dict[str, int]


def prompts_for(
    model, relation: Relation, template: str, samples: Sequence[RelationSample], examples
) -> list[PromptIds]:
    """Each sample's few-shot prompt (the examples other than itself, then its query)."""
    bos = prepend_bos_id(model)
    out = []
    for s in samples:
        text, end = make_prompt(template, s.subject, examples)
        out.append(encode_prompt(model.tokenizer, bos, text, end, relation.name, s.subject))
    return out


def model_answers(model, Z: Tensor) -> Tensor:
    """The model's own next token for last-layer states Z (its top-1 after the final norm)."""
    return decode(model, Z).argmax(-1)


def choose_split(
    model, relation: Relation, checked: CheckedSamples, cfg: LREConfig, layers, gen
) -> Split:
    """Train samples the model answers correctly with the others as examples, then the held-out
    samples it answers correctly after them. A first pass after the first n_train drawn samples
    puts the samples the model knows first; train samples still wrong in their own prompts are
    replaced, for up to `max_rounds` rounds."""
    template = relation.template(cfg.template)
    S, ids = checked.samples, torch.tensor(checked.object_ids)
    pool = torch.randperm(len(S), generator=gen).tolist()[: cfg.max_samples or None]
    n = cfg.n_train
    need = f"the split needs n_train={n} + min_test={cfg.min_test} samples answered correctly"
    if len(pool) < n + cfg.min_test:
        raise RelationDataError(f"relation {relation.name!r}: only {len(pool)} samples; {need}")
    ex0, first = [S[i] for i in pool[:n]], pool[n:]
    _, Z0 = prompt_states(
        model, prompts_for(model, relation, template, [S[i] for i in first], ex0), []
    )
    hit = (model_answers(model, Z0) == ids[first]).tolist()
    order = [i for i, h in zip(first, hit, strict=True) if h] + pool[:n]
    order += [i for i, h in zip(first, hit, strict=True) if not h]
    train, rest, rejected, rounds, good = order[:n], order[n:], 0, 0, False
    while rounds < cfg.max_rounds and len(train) == n:
        rounds += 1
        ex = [S[i] for i in train]
        tp = prompts_for(model, relation, template, ex, ex)
        H_tr, Z_tr = prompt_states(model, tp, layers)
        ok = (model_answers(model, Z_tr) == ids[train]).tolist()
        if all(ok):
            good = True
            break
        rejected += ok.count(False)
        keep = [i for i, o in zip(train, ok, strict=True) if o]
        train, rest = keep + rest[: n - len(keep)], rest[n - len(keep) :]
    if not good:
        raise RelationDataError(
            f"relation {relation.name!r}: no {n} train samples answered correctly in context after "
            f"{rounds} rounds ({sum(hit)} of {len(first)} answered correctly after {n} other drawn "
            f"samples as examples); {need}"
        )
    ex = [S[i] for i in train]
    cand = [i for i in pool if i not in set(train)]
    cp = prompts_for(model, relation, template, [S[i] for i in cand], ex)
    H_c, Z_c = prompt_states(model, cp, layers)
    known = (model_answers(model, Z_c) == ids[cand]).nonzero().flatten().tolist()
    if len(known) < cfg.min_test:
        raise RelationDataError(
            f"relation {relation.name!r}: {len(known)} of {len(cand)} held-out samples are answered "
            f"correctly in context; {need} (raise max_samples or lower min_test)"
        )
    keep = known[: cfg.max_test or None]
    return Split(
        train=ex,
        test=[S[cand[k]] for k in keep],
        train_obj=ids[train],
        test_obj=ids[[cand[k] for k in keep]],
        train_prompts=tp,
        test_prompts=[cp[k] for k in keep],
        H_train=H_tr,
        Z_train=Z_tr,
        H_test={L: h[keep] for L, h in H_c.items()},
        Z_test=Z_c[keep],
        counts={
            "n_drawn": len(pool),
            "n_correct_first_pass": sum(hit),
            "train_rounds": rounds,
            "n_train_rejected": rejected,
            "n_heldout": len(cand),
            "n_heldout_correct": len(known),
            "n_test": len(keep),
        },
    )


def mean_jacobians(
    model, prompts: Sequence[PromptIds], layers: Sequence[int], chunk: int = 64
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """({layer: W}, {layer: b}): the mean over prompts of J = dz/dh and of z - J h, every layer
    from one backward pass per prompt (the paper's estimator)."""
    d = model.cfg.d_model
    eye = torch.eye(d)
    W = {L: torch.zeros(d, d) for L in layers}
    b = {L: torch.zeros(d) for L in layers}
    for p in prompts:
        z, h, J = SubjectFunction(model, p, layers).jacobian_rows(eye, chunk)
        for L in layers:
            W[L] += J[L] / len(prompts)
            b[L] += (z - J[L] @ h[L]) / len(prompts)
    return W, b


def top1_hits(model, z_hat: Tensor, obj: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
    """(top token over the vocabulary == obj, top among the candidate object tokens == obj)."""
    logits = decode(model, z_hat)
    among = candidates[logits[:, candidates].argmax(-1)]
    return logits.argmax(-1) == obj, among == obj


def edit_pairs(obj: Tensor, n_pairs: int | None, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(sources, targets): each source paired with a random held-out sample of another object
    token (the paper's edit targets); sources in random order, at most n_pairs."""
    src, tgt = [], []
    for i in torch.randperm(len(obj), generator=gen).tolist():
        others = (obj != obj[i]).nonzero().flatten()
        if len(others):
            src.append(i)
            tgt.append(int(others[torch.randint(len(others), (1,), generator=gen)]))
        if n_pairs is not None and len(src) >= n_pairs:
            break
    return torch.tensor(src, dtype=torch.long), torch.tensor(tgt, dtype=torch.long)


def _interval(x: Tensor, cfg: LREConfig, seed: int) -> dict[str, float]:
    """{mean, lo, hi, n} of per-item values (bootstrap over items)."""
    mean, lo, hi = bootstrap_mean(x.float(), n_boot=cfg.n_boot, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi, "n": int(x.numel())}


def evaluate_relation(
    model, relation: Relation, cfg: LREConfig, layers: Sequence[int], seed: int = 0
) -> dict:
    """Every operator of one relation at every layer: faithfulness and causality with intervals."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    template = relation.template(cfg.template)
    checked = check_samples(
        relation, model.tokenizer, prepend_bos_id(model), template, strict=cfg.strict
    )
    split = choose_split(model, relation, checked, cfg, layers, gen)
    t_split = time.perf_counter()
    cand = torch.tensor(sorted(set(checked.object_ids)))
    n_jac = cfg.n_jacobian or cfg.n_train
    W, b = mean_jacobians(model, split.train_prompts[:n_jac], layers, cfg.chunk)
    t_jac = time.perf_counter()
    src, tgt = edit_pairs(split.test_obj, cfg.n_pairs, gen)
    ranks = [k for k in cfg.ranks if k < model.cfg.d_model]
    obj = split.test_obj
    by_layer, edits = {}, {}
    for L in layers:
        lre = lre_from_weight(W[L], b[L], cfg.beta)
        ops = fit_baselines(
            split.H_train[L], split.Z_train, cfg.lock_rank, cfg.lock_steps, seed=seed + L
        )
        Ht = split.H_test[L]
        preds = {"lre": lre(Ht), **{f"lre@{k}": lre(Ht, k) for k in ranks}}
        preds.update({name: ops[name](Ht) for name in BASELINES})
        vocab, among = {}, {}
        for m, z_hat in preds.items():
            v, a = top1_hits(model, z_hat, obj, cand)
            vocab[m], among[m] = _interval(v, cfg, seed), _interval(a, cfg, seed)
        dz = split.Z_test[tgt] - split.Z_test[src]
        # no full-rank edit: W's smallest singular values make its whole pseudo-inverse explode
        deltas = {f"lre@{k}": lre.edit(dz, k) for k in ranks}
        deltas["identity"] = dz
        deltas["linreg"] = ops["linreg"].edit(dz)
        deltas["meandiff"] = class_mean_edit(
            split.H_train[L], split.train_obj, Ht[src], obj[src], Ht[tgt], obj[tgt]
        )
        deltas["lock"] = ops["lock"].edit(dz)
        for m, dh in deltas.items():
            edits[(m, L, "op")] = dh.float()
            edits[(m, L, "random")] = same_norm_random(dh.float(), gen)
        by_layer[str(L)] = {
            "faithfulness": vocab,
            "faithfulness_objects": among,
            "edit_norm": {m: float(dh.norm(dim=-1).mean()) for m, dh in deltas.items()},
            "h_norm": float(Ht.norm(dim=-1).mean()),
        }
    causal = causality(model, split, src, tgt, edits, layers)
    for L in layers:
        bl = by_layer[str(L)]
        for key, name in (("efficacy", "causality"), ("top1", "causality_top1")):
            for kind, suffix in (("op", ""), ("random", "_random")):
                bl[name + suffix] = {
                    m: _interval(causal[(m, L, kind)][key], cfg, seed)
                    for m in sorted({k[0] for k in edits})
                }
            bl[name]["translation"] = bl[name]["identity"]  # W = I: the same edit
            bl[name + "_random"]["translation"] = bl[name + "_random"]["identity"]
    return {
        "name": relation.name,
        "kind": relation.kind,
        "template": template,
        "n_samples": len(relation.samples),
        "n_duplicates": relation.n_duplicates,
        "n_checked": len(checked.samples),
        "dropped": list(checked.dropped[:3]),
        "n_dropped": len(checked.dropped),
        **split.counts,
        "n_train": len(split.train),
        "n_jacobian": min(n_jac, len(split.train)),
        "n_pairs": len(src),  # 0 when every held-out sample has the same object token
        "n_test_objects": len(set(obj.tolist())),
        "n_objects": len(cand),
        "suffix_len": sum(p.suffix_len for p in split.train_prompts) / len(split.train_prompts),
        "train": [asdict(s) for s in split.train],
        "by_layer": by_layer,
        "seconds": {
            "split": round(t_split - t0, 1),
            "jacobian": round(t_jac - t_split, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
    }


def causality(
    model, split: Split, src: Tensor, tgt: Tensor, edits: dict, layers: Sequence[int]
) -> dict:
    """Per edit key, ({"efficacy": p(target) > p(source), "top1": target on top}) per pair, with
    every edit of one source run as one batch."""
    keys = list(edits)
    d = model.cfg.d_model
    out = {k: {"efficacy": [], "top1": []} for k in keys}
    for j, (s, t) in enumerate(zip(src.tolist(), tgt.tolist(), strict=True)):
        deltas = {L: torch.zeros(len(keys), d) for L in layers}
        for r, k in enumerate(keys):
            deltas[k[1]][r] = edits[k][j]
        logits = edited_logits(model, split.test_prompts[s], deltas)
        ts, tt = int(split.test_obj[s]), int(split.test_obj[t])
        for r, k in enumerate(keys):
            out[k]["efficacy"].append(bool(logits[r, tt] > logits[r, ts]))
            out[k]["top1"].append(bool(logits[r].argmax() == tt))
    return {
        k: {m: torch.tensor(v, dtype=torch.float) for m, v in d_.items()} for k, d_ in out.items()
    }


# ---------------------------------------------------------------- over relations


def _over(values: list[float], cfg: LREConfig, seed: int) -> dict[str, float]:
    """Mean over relations with a bootstrap interval over relations."""
    return _interval(torch.tensor(values, dtype=torch.float), cfg, seed)


def summarize(relations: list[dict], layer: int, cfg: LREConfig, seed: int = 0) -> dict:
    """The headline at `layer`: per method the mean over relations (interval over relations),
    the LRE minus each baseline (paired over relations), per kind, and which relations are linear
    (LRE faithfulness >= linear_threshold). Relations whose held-out samples all share one
    object token are listed as degenerate and left out of the means: any constant offset is
    "faithful" there and no edit can change the object."""
    scored = [r for r in relations if "by_layer" in r]
    degenerate = sorted(r["name"] for r in scored if r["n_test_objects"] < 2)
    done = [r for r in scored if r["n_test_objects"] >= 2]
    out: dict = {
        "layer": layer,
        "lre_edit": f"lre@{cfg.edit_rank}",
        "n_relations": len(done),
        "degenerate": degenerate,
        "skipped": {r["name"]: r["skipped"] for r in relations if "skipped" in r},
    }
    if not done:
        return out
    at = [r["by_layer"][str(layer)] for r in done]
    lre_c = out["lre_edit"]
    measures = {
        "faithfulness": ("faithfulness", ["lre", *BASELINES]),
        "faithfulness_objects": ("faithfulness_objects", ["lre", *BASELINES]),
        "causality": ("causality", [lre_c, *BASELINES]),
    }
    kinds = sorted({r["kind"] for r in done})
    for label, (key, methods) in measures.items():
        vals = {m: [a[key][m]["mean"] for a in at] for m in methods}
        block = {"mean": {m: _over(v, cfg, seed) for m, v in vals.items()}}
        lead = methods[0]
        block["lre_minus"] = {
            m: _over([x - y for x, y in zip(vals[lead], vals[m], strict=True)], cfg, seed)
            for m in methods[1:]
        }
        block["beats_every_baseline"] = all(v["lo"] > 0 for v in block["lre_minus"].values())
        block["by_kind"] = {
            k: {
                m: _over(
                    [v for v, r in zip(vals[m], done, strict=True) if r["kind"] == k], cfg, seed
                )
                for m in methods
            }
            for k in kinds
        }
        if key == "causality":
            block["random"] = {
                m: _over([a["causality_random"][m]["mean"] for a in at], cfg, seed) for m in methods
            }
        out[label] = block
    # the paper's choice, optimistic here: each relation's best rank, picked on the same edits
    ranks = [k for k in at[0]["causality"] if k.startswith("lre@")]
    best = [max(a["causality"][k]["mean"] for k in ranks) for a in at]
    out["causality"]["lre_best_rank"] = _over(best, cfg, seed)
    faith = {r["name"]: a["faithfulness"]["lre"]["mean"] for r, a in zip(done, at, strict=True)}
    out["linear"] = sorted(n for n, f in faith.items() if f >= cfg.linear_threshold)
    out["not_linear"] = sorted(n for n, f in faith.items() if f < cfg.linear_threshold)
    out["best_layer"] = {
        r["name"]: max(
            r["by_layer"], key=lambda L, r=r: r["by_layer"][L]["faithfulness"]["lre"]["mean"]
        )
        for r in scored
    }
    return out


def resolve_layers(model, cfg: LREConfig, hooks: Sequence[str]) -> tuple[list[int], int]:
    """(layers swept, headline layer), checked: a subject layer must leave a block above it."""
    layers = list(cfg.layers) if cfg.layers else [hook_layer(h) for h in hooks]
    layers = sorted({int(L) for L in layers if L is not None})
    top = model.cfg.n_layers - 2
    if not layers or any(not 0 <= L <= top for L in layers):
        raise ValueError(
            f"lre.layers={layers}: give subject layers in 0..{top} (the state after that block; "
            "z is read after the last block, so the last layer has nothing to map)"
        )
    main = layers[0] if cfg.layer is None else int(cfg.layer)
    if main not in layers:
        raise ValueError(f"lre.layer={main} is not among lre.layers={layers}")
    return layers, main


def relation_names(cfg: LREConfig) -> list[str]:
    """The relations to run, each resolved (an unknown name fails before any model work)."""
    names = list(cfg.relations) if cfg.relations else []
    if not names:
        for kind in cfg.kinds:
            names += available_relations(kind)
    for n in names:
        relation_path(n)
    return names


def run(cfg, ctx: RelationsContext) -> dict:
    """The "lre" analysis: every relation, every layer; results per relation and the headline."""
    c = settings(cfg, LREConfig)
    layers, main = resolve_layers(ctx.model, c, ctx.hooks)
    if c.edit_rank not in c.ranks or c.edit_rank >= ctx.model.cfg.d_model:
        raise ValueError(
            f"lre.edit_rank={c.edit_rank} must be one of lre.ranks={c.ranks} and below "
            f"d_model={ctx.model.cfg.d_model}"
        )
    names = relation_names(c)
    relations = []
    for k, name in enumerate(names):
        rel = load_relation(name)  # a malformed file is an error whatever `strict` says
        seed = int(ctx.seed) + zlib.crc32(rel.name.encode()) % 100_000
        try:
            res = evaluate_relation(ctx.model, rel, c, layers, seed)
        except RelationDataError as err:
            if c.strict:
                raise
            log.warning("lre: skipping %s: %s", rel.name, err)
            res = {"name": rel.name, "kind": rel.kind, "skipped": str(err)}
        relations.append(res)
        log.info("lre %d/%d %s: %s", k + 1, len(names), rel.name, res.get("seconds", "skipped"))
    return {
        "layers": layers,
        "main_layer": main,
        "settings": asdict(c),
        "relations": relations,
        "summary": summarize(relations, main, c, int(ctx.seed)),
    }
