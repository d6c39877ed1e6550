"""Steering over training seeds: one `run_steering` per lock run directory, one summary over all.

Owns what a benchmark needs from steering: load the model once (from the packaged Hydra model
config, so `model=hf model.spec=...` overrides work as on the command line), steer each seed's
artifact with the same options (each seed chooses its own alpha and positions on validation;
the prompts, and the arms no seed changes, are shared: measured once),
write each run's strict-JSON `steer.json`, and summarise every arm over prompts and seeds with
bootstrap intervals and paired tests against the mean difference. Knows nothing of training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analoglock.atomic import write_text
from analoglock.lock.steering.evaluate import arm_results, run_steering
from analoglock.lock.steering.summary import headline, jsonable, summarize
from analoglock.lock.steering.task import SteerOptions

log = logging.getLogger(__name__)

CONF_MODULE = "analoglock.conf"  # the packaged configs (named, not imported: cli sits above lock)
STEER_FILE = "steer.json"


def load_model_from_config(model_overrides: Sequence[str] = ()):
    """The model the packaged `steer` config names, with overrides (e.g. model=hf model.spec=...)."""
    import hydra
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module=CONF_MODULE, version_base=None):
        cfg = compose("steer", overrides=[*model_overrides, "ckpt=unused"])
    return hydra.utils.instantiate(cfg.model)


def steer_seeds(
    run_dirs: Sequence[str | Path],
    model=None,
    model_overrides: Sequence[str] = (),
    judge=None,
    write: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Steer every run directory's lock and summarise over seeds.

    `options` are `SteerOptions` fields (n_random=, max_new_tokens=, n_prompts=, ...). Returns the
    flat headline numbers (`headline`: the lock's, meandiff_*, unsteered_*, each with *_ci) plus
    "steer_summary" (every arm, every measure, paired tests) and "steer_choices" (each seed's
    chosen alpha and positions, and the mean difference's scales). With `write`, each run
    directory gets its `steer.json`.
    """
    from analoglock.lock.export import load_artifact
    from analoglock.model import model_info

    if not run_dirs:
        raise ValueError("steer_seeds needs at least one lock run directory")
    opts = SteerOptions(**options)
    opts.check()
    model = model if model is not None else load_model_from_config(model_overrides)
    reports = []
    tasks: dict = {}  # shared: the unsteered and mean-difference arms are measured once
    for run_dir in run_dirs:
        artifact = load_artifact(run_dir, model)
        report = run_steering(model, artifact, opts, judge=judge, tasks=tasks)
        report = {"ckpt": str(run_dir), "model": model_info(model).to_dict(), **report}
        if write:
            path = Path(run_dir) / STEER_FILE
            write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
        reports.append(report)
    summary = summarize([arm_results(r) for r in reports], n_boot=opts.n_boot, seed=opts.seed)
    choices = [
        {
            "ckpt": r["ckpt"],
            "alpha": r["selection"]["lock"]["alpha"],
            "positions": r["selection"]["lock"]["positions"],
            "constraint_met": r["selection"]["lock"]["constraint_met"],
            "meandiff_scale": r["selection"].get("meandiff", {}).get("scale"),
            "meandiff_best_scale": r["selection"].get("meandiff_best", {}).get("scale"),
            "random_p_values": r["test"]["random"]["p_values"],
        }
        for r in reports
    ]
    return jsonable({**headline(summary), "steer_summary": summary, "steer_choices": choices})


__all__ = ["load_model_from_config", "steer_seeds"]
