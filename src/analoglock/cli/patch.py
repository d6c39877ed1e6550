"""analoglock-patch: feature-to-feature effects between two saved bases; graph.json + report.html.

Example: `analoglock-patch upstream=runs/bases/pca-l6 downstream=runs/bases/pca-l12 method=both`.
Refuses bases fit on another model, a downstream hook before the upstream one, alpha outside
[0, 1] and empty prompt sets, before loading anything heavy where it can.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from analoglock.cli._args import as_list
from analoglock.cli._conf import CONF_PATH

log = logging.getLogger(__name__)


def position_rule_from(spec: Any, include_bos: bool):
    """A positions rule from a name (all, last, spans, ...) or a {_target_: ...} mapping."""
    from analoglock.positions import AllTokens, position_rule

    if isinstance(spec, DictConfig):
        return hydra.utils.instantiate(spec)
    if spec == "all":
        return AllTokens(include_bos=bool(include_bos))
    return position_rule(str(spec))


def load_docs(name: Any, cfg: DictConfig, classes: Any):
    """Documents from a dataset name or a file, with the run's split/side/limit."""
    from analoglock.data import load_documents

    if name is None:
        return None
    return load_documents(str(name), split=cfg.split, side=cfg.side, classes=as_list(classes, none="keep"), limit=cfg.limit)  # fmt: skip


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="patch")
def main(cfg: DictConfig) -> None:
    """Check the arguments, load the model and prompts, run, print the summary."""
    from analoglock.atomic import check_out_dir, finite
    from analoglock.patching.graph import Thresholds
    from analoglock.patching.run import check_args, preflight, run_patch
    from analoglock.reports.patch import write_run_report

    check_args(cfg.mode, cfg.alpha, cfg.method)  # fail before the model loads
    check_out_dir(cfg.out_dir)
    preflight(cfg.upstream, cfg.downstream)
    thresholds = Thresholds(**OmegaConf.to_container(cfg.threshold))
    docs = load_docs(cfg.prompts, cfg, cfg.classes)
    if not docs:
        raise SystemExit(f"prompts={cfg.prompts!r} gave no documents (split={cfg.split}, limit={cfg.limit}).")  # fmt: skip
    sources = load_docs(cfg.source, cfg, cfg.source_classes)
    model = hydra.utils.instantiate(cfg.model)
    run = run_patch(
        model,
        cfg.upstream,
        cfg.downstream,
        docs,
        cfg.out_dir,
        mode=cfg.mode,
        alpha=cfg.alpha,
        method=cfg.method,
        path=cfg.path,
        sources=sources,
        intervene_at=position_rule_from(cfg.intervene_at, cfg.include_bos),
        measure_at=position_rule_from(cfg.measure_at, cfg.include_bos),
        upstream_features=as_list(cfg.upstream_features, none="keep"),
        downstream_features=as_list(cfg.downstream_features, none="keep"),
        max_upstream=cfg.max_upstream,
        max_downstream=cfg.max_downstream,
        thresholds=thresholds,
        agreement_k=cfg.agreement_k,
        control=cfg.control,
        seed=cfg.seed,
        batch_tokens=cfg.batch_tokens,
        max_length=cfg.max_length,
        progress=cfg.progress,
    )
    report = write_run_report(run)
    print(json.dumps(finite(run.summary), indent=2, allow_nan=False))
    print(f"wrote {cfg.out_dir}/graph.json, effects.safetensors, {report.name}")


if __name__ == "__main__":
    main()
