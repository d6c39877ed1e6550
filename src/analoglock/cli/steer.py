"""analoglock-steer: steer with a lock's map, or with vectors from a contrast set, beside controls.

Example: `analoglock-steer ckpt=checkpoints/fable_to_work`. Chooses the map's alpha and positions
(and the mean difference's scale) on the validation split, evaluates once on the test split beside
the unsteered model, the shuffled-pairs map, the mean difference and random directions, writes
`steer.json` and `steer.html`, and prints per prompt the unsteered, lock and mean-difference
texts beside the data's workplace analogue, then the numbers with their intervals.

Example: `analoglock-steer contrast=emotion:angry-calm 'aggregator=[meandiff,pca,probe]'
'layers=[12]'`. Aggregates one vector per aggregator and layer from the contrast's train rows,
chooses each one's scale on validation and evaluates once on test (`relations.contrast_steer`),
writes `steer.json`, `steer.html` and `vector-<aggregator>.safetensors` (for
`analoglock-export-vector`) into runs/steer/<contrast>, and prints the generations and numbers.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from analoglock.cli._conf import CONF_PATH


def _floats(name: str, value: Any) -> tuple[float, ...]:
    """A number or a list of numbers from the config."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}={value!r}: give a number or a list of numbers.") from err


def _strings(value: Any) -> tuple[str, ...]:
    """A string or a list of strings from the config."""
    return (
        tuple(str(v) for v in value)
        if isinstance(value, (list, tuple, ListConfig))
        else (str(value),)
    )


def options(cfg: DictConfig):
    """SteerOptions from the config (reads a prompts file, so a bad path fails before the model)."""
    from analoglock.lock.steering import SteerOptions, read_prompts

    prompts = cfg.prompts
    prompts = read_prompts(list(prompts) if isinstance(prompts, ListConfig) else prompts)
    return SteerOptions(
        alphas=_floats("alpha", cfg.alpha),
        positions=_strings(cfg.map_positions),
        scales=_floats("scale", cfg.scale),
        meandiff_positions=_strings(cfg.meandiff_positions),
        n_random=int(cfg.n_random),
        random_norm=str(cfg.random_norm),
        max_new_tokens=int(cfg.max_new_tokens),
        max_sentences=int(cfg.max_sentences),
        batch_size=int(cfg.batch_size),
        seed=int(cfg.seed),
        max_fluency=float(cfg.max_fluency),
        min_diversity=float(cfg.min_diversity),
        n_prompts=None if cfg.n_prompts is None else int(cfg.n_prompts),
        prompts=prompts,
        hook=cfg.hook,
        allow_extrapolation=bool(cfg.allow_extrapolation),
        truncate=bool(cfg.truncate),
        n_boot=int(cfg.n_boot),
        progress=bool(cfg.progress),
        ask=None if cfg.get("ask") is None else str(cfg.ask),
    )


def mode(cfg: DictConfig) -> str:
    """ "lock" (ckpt=) or "contrast" (contrast=); both or neither is an error saying what to give."""
    ckpt, contrast = cfg.get("ckpt"), cfg.get("contrast")
    if (ckpt is None) == (contrast is None):
        got = f"both (ckpt={ckpt}, contrast={contrast})" if ckpt is not None else "neither"
        raise ValueError(
            "analoglock-steer needs exactly one of ckpt=<lock run directory> (steer with a lock's "
            "map) and contrast=<set:a-b | pair dataset | file.jsonl> (steer with vectors from a "
            f"contrast set, e.g. contrast=emotion:angry-calm); got {got}."
        )
    return "lock" if ckpt is not None else "contrast"


def paths(cfg: DictConfig) -> tuple[Path, Path]:
    """(steer.json, steer.html): out= and plot=, else in out_dir (default: the lock run directory,
    or runs/steer/<contrast> with the spec as a folder name)."""
    out_dir = cfg.get("out_dir")
    if out_dir is None:
        if mode(cfg) == "lock":
            out_dir = str(cfg.ckpt)
        else:
            name, _, rel = str(cfg.contrast).partition(":")
            out_dir = "runs/steer/" + re.sub(r"[^\w.-]+", "-", Path(name).stem + "-" * bool(rel) + rel)  # fmt: skip
    out = Path(cfg.out) if cfg.get("out") else Path(out_dir) / "steer.json"
    plot = Path(cfg.plot) if cfg.get("plot") else Path(out_dir) / "steer.html"
    return out, plot


def contrast_options(cfg: DictConfig):
    """ContrastOptions from the config, checked (bad aggregators, layers, reads, scales or a bad
    prompts file fail before the model loads)."""
    from analoglock.cli._args import as_list
    from analoglock.lock.steering import read_prompts
    from analoglock.relations.contrast_steer import ContrastOptions

    prompts = cfg.prompts
    opts = ContrastOptions(
        aggregators=_strings(cfg.aggregator),
        layers=as_list(cfg.layers),
        read=str(cfg.read),
        probe_layer=cfg.probe_layer,
        scales=_floats("scale", cfg.scale),
        positions=_strings(cfg.vector_positions),
        n_random=int(cfg.n_random),
        max_new_tokens=int(cfg.max_new_tokens),
        max_sentences=int(cfg.max_sentences),
        n_prompts=None if cfg.n_prompts is None else int(cfg.n_prompts),
        prompts=read_prompts(list(prompts) if isinstance(prompts, ListConfig) else prompts),
        max_fluency=float(cfg.max_fluency),
        min_diversity=float(cfg.min_diversity),
        probe_l2=float(cfg.probe_l2),
        judge=bool(cfg.judge),
        batch_size=int(cfg.batch_size),
        seed=int(cfg.seed),
        n_boot=int(cfg.n_boot),
        truncate=bool(cfg.truncate),
        progress=bool(cfg.progress),
    )
    opts.check()
    return opts


def run(cfg: DictConfig) -> dict[str, Any]:
    """Everything `main` does but printing; returns the report (tests call this)."""
    from analoglock.atomic import write_text
    from analoglock.model import model_info

    out, plot = paths(cfg)  # also refuses both or neither of ckpt / contrast
    if mode(cfg) == "contrast":
        from analoglock.relations.contrast import load_contrast
        from analoglock.relations.contrast_steer import export_vectors, steer_contrast
        from analoglock.reports.contrast import plot_contrast as plot_report

        opts = contrast_options(cfg)
        contrast = load_contrast(cfg.contrast, int(cfg.max_sentences))  # checked before the model
        model = hydra.utils.instantiate(cfg.model)
        report, vectors = steer_contrast(model, contrast, opts)
        info = model_info(model).to_dict()
        report = {"contrast": str(cfg.contrast), "model": info, **report}
        report["vector_files"] = export_vectors(report, vectors, info, out.parent)
    else:
        from analoglock.lock.export import load_artifact
        from analoglock.lock.steering import run_steering
        from analoglock.reports.steering import plot_steering as plot_report

        opts = options(cfg)
        opts.check()  # bad alphas / positions fail before the model loads
        model = hydra.utils.instantiate(cfg.model)
        artifact = load_artifact(cfg.ckpt, model)
        report = run_steering(model, artifact, opts, dataset=cfg.dataset)
        report = {"ckpt": str(cfg.ckpt), "model": model_info(model).to_dict(), **report}
    report["config"] = OmegaConf.to_container(cfg, resolve=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(report, indent=2, allow_nan=False) + "\n")  # strict JSON
    figures = plot_report(report, plot)
    if cfg.wandb:
        log_wandb(cfg, report, figures)
    return report


def print_report(report: dict[str, Any], n_show: int = 8) -> None:
    """Per prompt: unsteered, lock, mean difference and the data's analogue; then the numbers."""
    from rich.console import Console
    from rich.table import Table

    # A log or a pipe gets 80 columns by default, which folds every number: give the table room.
    console = Console(width=None if sys.stdout.isatty() else 220)
    sel = report["selection"]
    lock, md = sel["lock"], sel.get("meandiff", {})
    console.print(
        f"[bold]{report['dataset']} at {report['hook']}[/bold]: lock alpha {lock['alpha']:g} at "
        f"{lock['positions']} positions; mean difference scale {md.get('scale', float('nan')):g} "
        f"(fluency-matched), chosen on {sel['split']} (n = {sel['n_prompts']})"
        + ("" if lock.get("constraint_met", True) else " [red](no setting met the limits)[/red]")
    )
    for g in report["generations"][:n_show]:
        console.rule(g["id"])
        console.print(f"[bold]prompt[/bold]      {g['prompt']}")
        for key, label in (
            ("unsteered", "unsteered"),
            ("lock", "lock"),
            ("meandiff", "mean diff"),
            ("asked", "asked"),
            ("analogue", "analogue"),
        ):
            if g.get(key) is not None:
                console.print(f"[bold]{label:<11}[/bold] {g[key]}")
    test = report["test"]
    summary = test["summary"]
    table = Table(
        title=f"{test['split']}: n = {test['n_prompts']} prompts, {test['n_role_items']} role "
        f"items, {test['n_neutral']} neutral prompts; value [95% bootstrap interval]"
    )
    measures = list(next(iter(summary["arms"].values())))
    table.add_column("arm")
    for m in measures:
        table.add_column(m, justify="right")

    def cell(c: dict[str, Any]) -> str:
        f = lambda x: "n/a" if x is None else f"{x:.3g}"  # noqa: E731
        return f"{f(c['value'])} [{f(c['lo'])}, {f(c['hi'])}]"

    for arm, cells in summary["arms"].items():
        table.add_row(arm, *(cell(cells[m]) for m in measures))
    rnd = test["random"]
    table.add_row(
        f"p vs {rnd['n']} random",
        *("n/a" if rnd["p_values"][m] is None else f"{rnd['p_values'][m]:.2g}" for m in measures),
    )
    for name, cells in summary["paired"].items():
        table.add_row(name, *(cell({**cells[m], "value": cells[m]["diff"]}) for m in measures))
    console.print(table)
    chance = ", ".join(f"{k} {v:.3g}" for k, v in test["chance"].items() if v is not None)
    console.print(f"chance: {chance}")


def print_contrast_report(report: dict[str, Any], n_show: int = 8) -> None:
    """Per prompt: unsteered, each aggregator and a random direction; then the numbers."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 220)
    src, probe, sel = report["source"], report["probe"], report["selection"]
    console.print(
        f"[bold]{src['spec']}[/bold]: toward {src['direction']} at {', '.join(report['hooks'])} "
        f"({report['read']} token); probe at {probe['hook']} held-out accuracy "
        f"{probe['heldout_accuracy']:.2f} (n = {probe['n_heldout']}, chance 0.5)"
    )
    for agg, c in sel["chosen"].items():
        met = "" if c.get("constraint_met", True) else " [red](no scale met the limits)[/red]"
        console.print(
            f"{agg}: scale {c['scale']:g} at {c['positions']}, chosen on {sel['split']} "
            f"(n = {sel['n_prompts']}){met}"
        )
    arms = ["unsteered", *report["aggregators"], "random"]
    for g in report["generations"][:n_show]:
        console.rule(g["id"])
        console.print(f"[bold]{'prompt':<10}[/bold] {g['prompt']}")
        for arm in arms:
            console.print(f"[bold]{arm:<10}[/bold] {g.get(arm)}")
    test = report["test"]
    table = Table(
        title=f"{test['split']}: n = {test['n_prompts']} prompts, {test['n_neutral']} neutral "
        "prompts; value [95% bootstrap interval]"
    )
    measures = report["measures"]
    table.add_column("arm")
    for m in measures:
        table.add_column(m, justify="right")

    def f(x: Any, digits: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{digits}g}"

    for arm, cells in test["summary"]["arms"].items():
        table.add_row(arm, *(f"{f(cells[m]['value'])} [{f(cells[m]['lo'])}, {f(cells[m]['hi'])}]" for m in measures))  # fmt: skip
    for agg, rnd in test["random"].items():
        table.add_row(f"{agg}: p vs {rnd['n']} random", *(f(rnd["p_values"][m], 2) for m in measures))  # fmt: skip
    for name, cells in test["summary"]["paired"].items():
        table.add_row(name, *(f"{f(cells[m]['diff'])} [{f(cells[m]['lo'])}, {f(cells[m]['hi'])}]" if m in cells else "" for m in measures))  # fmt: skip
    console.print(table)
    console.print(f"seconds: {', '.join(f'{k} {v:.0f}' for k, v in report['seconds'].items())}")


def log_wandb(cfg: DictConfig, report: dict[str, Any], figures: dict) -> None:
    """The numbers, generations and figures to a wandb run (offline unless a key is configured)."""
    import wandb

    offline = not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists())
    run = wandb.init(
        project="analoglock",
        job_type="steer",
        config=OmegaConf.to_container(cfg, resolve=True),
        mode="offline" if offline else None,
    )
    cols = list(report["generations"][0]) if report["generations"] else []
    run.log(
        {
            "steer/generations": wandb.Table(
                columns=cols, data=[[g.get(c) for c in cols] for g in report["generations"]]
            ),
            **{f"steer/{k}": v for k, v in figures.items()},
        }
    )
    run.summary.update({"steer/summary": report["test"]["summary"]["arms"]})
    run.finish()


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="steer")
def main(cfg: DictConfig) -> None:
    """Steer, write steer.json and steer.html, print the generations and the numbers."""
    report = run(cfg)
    out, plot = paths(cfg)
    if mode(cfg) == "contrast":
        print_contrast_report(report, int(cfg.n_show))
        vectors = ", ".join(report["vector_files"].values())
        print(f"wrote {out}, {plot} and {vectors}")
    else:
        print_report(report, int(cfg.n_show))
        print(f"wrote {out} and {plot}")


if __name__ == "__main__":
    main()
