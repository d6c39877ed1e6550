"""One patching run from saved bases to `graph.json` and `effects.safetensors`.

Owns the checks a run needs before any compute (both bases fit on the loaded model, h2 not
before h1, alpha in [0, 1], a non-empty prompt set, sources for counterfactual patching) and the
order of the steps; the math lives in the other modules of this package. The HTML report is
drawn from the returned `PatchRun` by `analoglock.reports.patch` (reports sit above patching).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analoglock.atomic import check_out_dir, finite, save_tensors, write_json
from analoglock.bases import load_basis
from analoglock.bases.base import read_basis_cfg
from analoglock.data.documents import Document
from analoglock.model import model_info
from analoglock.patching.attribution import agreement, attribution_effects
from analoglock.patching.exact import Effects, clean_runs, exact_effects
from analoglock.patching.graph import Thresholds, build_graph, node_activations, threshold_study
from analoglock.patching.interventions import MODES, InterventionError, make_intervention
from analoglock.patching.paths import parse_routes
from analoglock.patching.prompts import build_prompts
from analoglock.patching.segment import PatchSetupError, Segment, is_after, site_of

log = logging.getLogger(__name__)

METHODS = ("exact", "attribution", "both")
GRAPH_FILE, EFFECTS_FILE = "graph.json", "effects.safetensors"


@dataclass
class PatchRun:
    """What one run computed: the printed summary, graph.json's content, and the effects behind it."""

    summary: dict[str, Any]
    graph: dict[str, Any]
    effects: dict[str, Effects]
    agreement: dict[str, Any] | None
    threshold_study: dict[str, Any]
    out_dir: Path


def basis_model_sha(basis_dir: str | Path) -> str | None:
    """The model sha256 a saved basis records (cfg.json "model"), or None if it records none."""
    model = read_basis_cfg(basis_dir).get("model") or {}
    return model.get("sha256") if isinstance(model, dict) else None


def check_same_model(model, upstream_dir: str | Path, downstream_dir: str | Path) -> None:
    """Both bases must come from the loaded model (cfg.json "model" sha256)."""
    sha = model_info(model).sha256
    shas = {str(d): basis_model_sha(d) for d in (upstream_dir, downstream_dir)}
    known = {d: s for d, s in shas.items() if s}
    if len(set(known.values())) > 1:
        raise PatchSetupError(
            "The bases were fit on different models: "
            + ", ".join(f"{d} -> {s[:12]}" for d, s in known.items())
        )
    for d, s in known.items():
        if s != sha:
            raise PatchSetupError(
                f"Basis {d} was fit on model sha256 {s[:12]}, but the loaded model is "
                f"{model_info(model).spec} ({sha[:12]}); load the model the basis was fit on."
            )
    for d, s in shas.items():
        if not s:
            log.warning("Basis %s records no model; cannot check it matches the loaded one", d)


def preflight(upstream_dir: str | Path, downstream_dir: str | Path) -> None:
    """Checks that need only the bases' cfg.json: hook order, and one model for both."""
    hooks = [read_basis_cfg(d).get("hook") or "" for d in (upstream_dir, downstream_dir)]
    for d, h in zip((upstream_dir, downstream_dir), hooks, strict=True):
        if not h:
            raise PatchSetupError(f"Basis {d} records no hook in cfg.json; refit it with a hook")
    h1, h2 = site_of(hooks[0]), site_of(hooks[1])
    if not is_after(h1, h2):
        raise PatchSetupError(
            f"The downstream basis ({downstream_dir}, {h2.name}) sits before the upstream one "
            f"({upstream_dir}, {h1.name}); swap them: upstream must be at or before downstream."
        )
    shas = {basis_model_sha(d) for d in (upstream_dir, downstream_dir)} - {None}
    if len(shas) > 1:
        raise PatchSetupError(
            f"{upstream_dir} and {downstream_dir} were fit on different models "
            f"(sha256 {', '.join(sorted(s[:12] for s in shas))})"
        )


def check_args(mode: str, alpha: float, method: str) -> None:
    """Mode, alpha and method must be among the valid ones."""
    if mode not in MODES:
        raise InterventionError(f"Unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise InterventionError(f"alpha must be in [0, 1], got {alpha}")
    if method not in METHODS:
        raise PatchSetupError(f"Unknown method {method!r}; valid: {', '.join(METHODS)}")


def most_active(ids: Sequence[int] | None, activation: torch.Tensor, keep: int | None):
    """`ids` when given; else the `keep` most active nodes (sorted ids); else None (all)."""
    if ids is not None or keep is None or keep >= len(activation):
        return ids
    return activation.topk(int(keep)).indices.sort().values


def run_patch(
    model,
    upstream_dir: str | Path,
    downstream_dir: str | Path,
    docs: Sequence[Document],
    out_dir: str | Path,
    mode: str = "ablate",
    alpha: float = 1.0,
    method: str = "both",
    path: str | None = None,
    sources: Sequence[Document] | None = None,
    intervene_at=None,
    measure_at=None,
    upstream_features: Sequence[int] | None = None,
    downstream_features: Sequence[int] | None = None,
    max_upstream: int | None = None,
    max_downstream: int | None = None,
    thresholds: Thresholds | None = None,
    agreement_k: int = 200,
    control: bool = True,
    seed: int = 0,
    batch_tokens: int = 8192,
    max_length: int | None = 256,
    progress: bool = True,
) -> PatchRun:
    """Effects of every (kept) upstream feature on every downstream code; writes graph + effects."""
    t0 = time.perf_counter()
    thresholds = thresholds or Thresholds()
    check_args(mode, alpha, method)
    out = check_out_dir(out_dir)
    preflight(upstream_dir, downstream_dir)
    check_same_model(model, upstream_dir, downstream_dir)
    upstream, downstream = load_basis(upstream_dir), load_basis(downstream_dir)
    segment = Segment(model, upstream.hook, downstream.hook)
    if mode == "patch" and sources is None:
        raise PatchSetupError("mode=patch needs source prompts (counterfactual pairs): set source=")
    prompts = build_prompts(
        model,
        docs,
        intervene_at,
        measure_at,
        sources if mode == "patch" else None,
        max_length,
        drop_mismatched=True,
    )
    cleans = clean_runs(segment, prompts, progress)
    routes = parse_routes(path, segment)
    act_up, act_down = node_activations(upstream, downstream, cleans)
    up_ids = most_active(upstream_features, act_up, max_upstream)
    # Attribution costs one backward per downstream code: a 4,608-latent SAE needs a cut.
    down_ids = most_active(downstream_features, act_down, max_downstream)
    intervention = make_intervention(mode, alpha)
    kw = dict(upstream_ids=up_ids, downstream_ids=down_ids, routes=routes,
              control=control, seed=seed, progress=progress)  # fmt: skip
    effects: dict[str, Effects] = {}
    if method in ("exact", "both"):
        effects["exact"] = exact_effects(segment, cleans, upstream, downstream, intervention, batch_tokens=batch_tokens, **kw)  # fmt: skip
    if method in ("attribution", "both"):
        effects["attribution"] = attribution_effects(segment, cleans, upstream, downstream, intervention, **kw)  # fmt: skip
    main = effects.get("exact") or effects["attribution"]
    rows, cols = main.upstream, main.downstream
    act_up, act_down = act_up[rows], act_down[cols]
    agree = agreement(effects["exact"], effects["attribution"], agreement_k) if len(effects) == 2 else None  # fmt: skip
    study = threshold_study(effects, act_up, act_down, edges=thresholds.edges)
    meta = {
        "model": model_info(model).to_dict(),
        "intervention": main.intervention,
        "routes": main.routes,
        "n_prompts": len(prompts),
        "n_positions": main.n_positions,
        "agreement": agree,
        "threshold_study": study,
    }
    graph = build_graph(model, upstream, downstream, effects, act_up, act_down, thresholds,
                        upstream_dir, downstream_dir, meta)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"upstream_ids": rows, "downstream_ids": cols, "activation_upstream": act_up,
               "activation_downstream": act_down}  # fmt: skip
    for name, eff in effects.items():
        tensors[f"{name}/effect"] = eff.effect
        if eff.control is not None:
            tensors[f"{name}/control"] = eff.control
    save_tensors(out / EFFECTS_FILE, tensors)
    write_json(out / GRAPH_FILE, graph)
    summary = {
        "out_dir": str(out),
        "hooks": [segment.h1.name, segment.h2.name],
        "n_prompts": len(prompts),
        "methods": {k: v.to_dict() for k, v in effects.items()},
        "agreement": finite(agree),
        "edges": len(graph["edges"]),
        "edges_beating_control": sum(bool(e.get("beats_control")) for e in graph["edges"]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return PatchRun(summary, graph, effects, agree, study, out)


def effects_from_disk(out_dir: str | Path) -> dict[str, torch.Tensor]:
    """The matrices a run saved (safetensors, no unpickling)."""
    from safetensors.torch import load_file

    return load_file(str(Path(out_dir) / EFFECTS_FILE))
