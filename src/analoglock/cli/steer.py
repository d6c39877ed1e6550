"""analoglock-steer: steer fable prompts with a learned relation vector; report it beside controls.

Example: `analoglock-steer ckpt=runs/lock/fable_work scale=[0,4,8]`. Loads the model and the
relation (refusing one learned on another model), steers held-out prompts at each scale beside
random controls of equal norm and the artifact's baseline vectors (e.g. "meandiff"), writes
`steer.json` and `steer.html`, and prints before/after generations and the results table.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from analoglock.cli._conf import CONF_DIR
from analoglock.data.loaders import StoryPair, load_pairs

log = logging.getLogger(__name__)

# Everyday sentences that are neither fables nor workplace stories: steering should leave them be.
NEUTRAL_PROMPTS = (
    "The recipe calls for two cups of flour and a pinch of salt.",
    "It rained all morning, so the streets were still wet at noon.",
    "She bought a new pair of running shoes on Saturday.",
    "The train to the coast leaves at half past nine.",
    "Water boils at a lower temperature high in the mountains.",
    "He painted the kitchen walls a pale shade of yellow.",
    "The library is closed on public holidays.",
    "My grandmother grows tomatoes and basil in her garden.",
    "The concert was so loud that my ears rang afterwards.",
    "Remember to charge your phone before the long drive.",
)

STORY_PREFIX = "Once upon a time, "
# First words that read naturally in lower case after the prefix; anything else may be a name.
_LOWERABLE = {"a", "an", "the", "for", "one", "all", "every", "in", "on", "at", "when", "while"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def story_opening(text: str) -> str:
    """The first sentence of a story, prefixed so it reads as the opening of a told story."""
    first = _SENTENCE_END.split(text.strip(), maxsplit=1)[0]
    if first.lower().startswith("once upon a time"):
        return first
    word = first.split(" ", 1)[0]
    if word.lower() in _LOWERABLE:
        first = first[0].lower() + first[1:]
    return STORY_PREFIX + first


def read_prompts(spec: Any) -> list[str] | None:
    """Prompts from the config: None (use the dataset), a list, a .txt path, or one prompt."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple, ListConfig)):
        prompts = [str(p) for p in spec]
    else:
        spec = str(spec)
        path = Path(spec).expanduser()
        if path.suffix == ".txt" or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(
                    f"prompts={spec!r}: no such file. Give a .txt file with one prompt per line, "
                    "a list (prompts='[\"Once upon a time...\"]'), or null for the dataset."
                )
            prompts = path.read_text(encoding="utf-8").splitlines()
        else:
            prompts = [spec]  # a single prompt given inline
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"prompts={spec!r} holds no non-empty prompt.")
    return prompts


def pick_texts(
    pairs: list[StoryPair], prompts: list[str] | None, n_prompts: int
) -> tuple[list[str], list[str], list[str]]:
    """(prompts, A refs, B refs). Dataset prompts come from the first `n_prompts` pairs, and
    those pairs are kept out of the references, so the judge never compares a continuation with
    its own source story or that story's workplace analogue."""
    if prompts is None:
        used, refs = pairs[:n_prompts], pairs[n_prompts:]
        prompts = [story_opening(p.a) for p in used]
    else:
        refs = pairs
    if not refs:
        raise ValueError(
            f"n_prompts={n_prompts} uses all {len(pairs)} test pairs, leaving none as the judge's "
            "references; lower n_prompts."
        )
    return prompts, [p.a for p in refs], [p.b for p in refs]


def parse_scales(scale: Any) -> list[float]:
    """A number or a list of numbers."""
    values = list(scale) if isinstance(scale, (list, tuple, ListConfig)) else [scale]
    try:
        return [float(s) for s in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"scale={scale!r}: give a number or a list of numbers.") from err


def print_report(report: dict[str, Any]) -> None:
    """Results per scale, then the generations side by side (rich tables)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rows = report["results"]
    arms = [
        "learned",
        *(k.removesuffix("_judge_shift") for k in rows[0] if k.endswith("_judge_shift")),
    ]
    metrics = [k for k in rows[0] if k != "scale" and not any(k.startswith(f"{a}_") for a in arms)]
    table = Table(title=f"Steering at {report['hook']} (shifts are steered - unsteered)")
    for col in ("scale", "vector", *metrics):
        table.add_column(col, justify="right")
    for row in rows:
        for arm in arms:
            prefix = "" if arm == "learned" else f"{arm}_"
            values = (f"{row[prefix + m]:.4g}" for m in metrics)
            table.add_row(f"{row['scale']:g}", arm, *values, end_section=arm == arms[-1])
    console.print(table)
    scale = report["generation_scale"]
    gens = Table(title=f"Generations at scale {scale:g}", show_lines=True)
    columns = list(report["generations"][0]) if report["generations"] else []
    for col in columns:
        title = col if col in ("prompt", "before") else f"{col} ({scale:g})"
        gens.add_column(title, overflow="fold", ratio=1)
    for item in report["generations"]:
        gens.add_row(*(item[c] for c in columns))
    console.print(gens)


def log_wandb(cfg: DictConfig, report: dict[str, Any], fig) -> None:
    """Results, generations and the plot to a wandb run (offline unless a key is configured)."""
    import wandb

    offline = not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists())
    run = wandb.init(
        project="analoglock",
        job_type="steer",
        config=OmegaConf.to_container(cfg, resolve=True),
        mode="offline" if offline else None,
    )
    keys = list(report["results"][0])
    run.log(
        {
            "steer/results": wandb.Table(
                columns=keys, data=[list(r.values()) for r in report["results"]]
            )
        }
    )
    cols = list(report["generations"][0])
    run.log(
        {
            "steer/generations": wandb.Table(
                columns=cols, data=[[g[c] for c in cols] for g in report["generations"]]
            )
        }
    )
    run.log({"steer/plot": fig})
    run.finish()


def steering_hooks(learned_hook: str, layers) -> list[str]:
    """Where to add the relation: its own hook (layers=null) or that hook's kind at other layers."""
    if layers is None:
        return [learned_hook]
    layers = [layers] if isinstance(layers, int) else list(layers)
    kind = learned_hook.split(".", 2)[-1] if learned_hook.startswith("blocks.") else learned_hook
    return [f"blocks.{int(layer)}.{kind}" for layer in layers]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Everything `main` does, returning the report (tests call this with a composed config)."""
    from analoglock.atomic import write_json
    from analoglock.lock.export import load_relation
    from analoglock.lock.steering import evaluate_steering, plot_steering
    from analoglock.model import model_info

    user_prompts = read_prompts(cfg.prompts)  # fail on a bad path before loading anything
    scales = parse_scales(cfg.scale)
    model = hydra.utils.instantiate(cfg.model)
    relation = load_relation(cfg.ckpt, model)
    pairs = load_pairs(cfg.dataset, "test")  # held out from training
    prompts, a_refs, b_refs = pick_texts(pairs, user_prompts, int(cfg.n_prompts))
    wanted = list(cfg.baselines or [])
    missing = [k for k in wanted if k not in relation.vectors]
    if missing:  # older artifacts may lack one; steer with what there is, and say so
        log.warning(
            "%s has no vector %s (it holds %s)", cfg.ckpt, missing, sorted(relation.vectors)
        )
    baselines = {k: relation.vectors[k] for k in wanted if k in relation.vectors}
    report = evaluate_steering(
        model,
        relation.vector,
        steering_hooks(relation.hook, cfg.get("layers")),
        prompts,
        a_refs,
        b_refs,
        scales,
        NEUTRAL_PROMPTS,
        baselines,
        max_new_tokens=int(cfg.max_new_tokens),
        n_controls=int(cfg.n_controls),
        seed=int(cfg.seed),
        batch_size=int(cfg.batch_size),
        progress=bool(cfg.progress),
    )
    report = {
        "ckpt": str(cfg.ckpt),
        "model": model_info(model).to_dict(),
        "dataset": str(cfg.dataset),
        "n_refs": len(a_refs),
        **report,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    fig = plot_steering(report, cfg.plot)
    if cfg.wandb:
        log_wandb(cfg, report, fig)
    return report


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="steer")
def main(cfg: DictConfig) -> None:
    """Steer, write steer.json and steer.html, print the tables."""
    report = run(cfg)
    print_report(report)
    print(f"wrote {cfg.out} and {cfg.plot}")


if __name__ == "__main__":
    main()
