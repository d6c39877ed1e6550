"""analoglock-relations: harvest concept sets at a hook, run the relation analyses, write
relations.json (every number with its control and p-value) and report.html."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from analoglock.cli._args import as_list
from analoglock.cli._conf import CONF_PATH
from analoglock.relations.config import register_configs

register_configs()  # the analyses' dataclasses, which relations.yaml's defaults name

log = logging.getLogger(__name__)


def resolve_hooks(model, hook: str, layers: Any, hook_kind: str) -> list[str]:
    """`layers` expanded to blocks.L.<hook_kind>, else the single `hook`; validated."""
    from analoglock.hooks import validate_hooks

    ls = as_list(layers, none="empty")
    hooks = [f"blocks.{int(layer)}.{hook_kind}" for layer in ls] if ls else [str(hook)]
    return validate_hooks(model, hooks)


def load_concept_sets(
    model, names: list, hooks: list[str], pool: str, max_length: int, seed: int, progress: bool
) -> dict:
    """Each name: a shipped set, a .jsonl file, or a concept-set harvest directory."""
    from analoglock.activation_store import META_FILE
    from analoglock.relations.concepts import concepts_from_store, harvest_concepts

    if not names:
        raise ValueError("concepts= is empty; give shipped sets (e.g. [animals, gender]) or files")
    out = {}
    for name in names:
        path = Path(str(name))
        if path.is_dir() and (path / META_FILE).exists():
            ca = concepts_from_store(path, pool, model, seed)
            missing = [h for h in hooks if h not in ca.hooks]
            if missing:
                raise ValueError(
                    f"{path} has hooks {ca.hooks}, not {missing}; harvest those hooks or change hook="
                )
        else:
            ca = harvest_concepts(model, str(name), hooks, pool, max_length, progress=progress)
        if ca.name in out:
            raise ValueError(f"concept set {ca.name!r} given twice")
        out[ca.name] = ca
    return out


def load_run_basis(model, path: str | None, hooks: list[str]):
    """The basis at `path`, checked against the model and the hooks; None when not given."""
    if not path:
        return None
    from analoglock.bases import check_basis_matches, load_basis
    from analoglock.model import model_info

    cfg = check_basis_matches(path, model_info(model).sha256)
    if cfg.get("hook") and cfg["hook"] not in hooks:
        raise ValueError(
            f"basis {path} was fit at {cfg['hook']!r}, which is not among the hooks {hooks}; "
            f"set hook={cfg['hook']} or fit a basis at one of them"
        )
    return load_basis(path)


def run_analyses(cfg: DictConfig, ctx, names: list[str]) -> dict[str, float]:
    """Run each named analysis into ctx.results; returns seconds per analysis."""
    from analoglock.registry import lookup
    from analoglock.relations import ANALYSES

    runners = {n: lookup(ANALYSES, str(n), "analysis") for n in names}  # fail before any work
    seconds = {}
    for name, runner in runners.items():
        t = time.perf_counter()
        log.info("analysis %s", name)
        try:
            ctx.results[name] = runner(cfg.get(name) or {}, ctx)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("analoglock.relations."):
                raise ValueError(
                    f"analysis {name!r} is registered but its module {err.name} is missing"
                ) from err
            raise
        seconds[name] = round(time.perf_counter() - t, 2)
    return seconds


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="relations")
def main(cfg: DictConfig) -> None:
    """Load model and concept sets, run the analyses, write relations.json and report.html."""
    from analoglock.model import model_info
    from analoglock.relations import RelationsContext
    from analoglock.reports.relations import headline, jsonable, write_outputs

    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    t0 = time.perf_counter()
    model = hydra.utils.instantiate(cfg.model)
    t_load = time.perf_counter() - t0
    hooks = resolve_hooks(
        model, cfg.hook, cfg.get("layers"), cfg.get("hook_kind", "hook_resid_post")
    )
    names = [str(a) for a in as_list(cfg.analyses, none="empty")]
    t1 = time.perf_counter()
    concepts = load_concept_sets(
        model,
        as_list(cfg.concepts, none="empty"),
        hooks,
        cfg.pool,
        cfg.max_length,
        cfg.seed,
        cfg.progress,
    )
    t_harvest = time.perf_counter() - t1
    ctx = RelationsContext(
        model=model,
        hooks=hooks,
        concepts=concepts,
        basis=load_run_basis(model, cfg.get("basis"), hooks),
        seed=int(cfg.seed),
        out_dir=Path(cfg.out_dir),
    )
    seconds = run_analyses(cfg, ctx, names)
    meta = {
        "model": model_info(model).spec,
        "model_sha256": model_info(model).sha256,
        "hooks": ", ".join(hooks),
        "concepts": ", ".join(
            f"{n} ({len(c.classes)} classes x {c.n_items} items)" for n, c in concepts.items()
        ),
        "pool": cfg.pool,
        "seed": int(cfg.seed),
        "load_s": round(t_load, 2),
        "harvest_s": round(t_harvest, 2),
        "seconds": seconds,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    paths = write_outputs(cfg.out_dir, ctx.results, meta)
    summary = {
        "out": {k: str(v) for k, v in paths.items()},
        "load_s": meta["load_s"],
        "harvest_s": meta["harvest_s"],
        "seconds": seconds,
        "headline": headline(jsonable(ctx.results)),
    }
    anomalies = ctx.results.get("anomalies", {}).get("ranked", [])[:5]
    if anomalies:
        summary["top_anomalies"] = [
            f"{a['kind']} | {a['target']} | z={a['robust_z']:.1f}" for a in anomalies
        ]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
