"""analoglock-export-vector: write a steering vector as a llama.cpp control vector GGUF.

Example: `analoglock-export-vector src=checkpoints/fable_to_work` writes
`checkpoints/fable_to_work/controlvector-learned.gguf` (+ `.safetensors`). From a lock run it takes
the `learned` or `meandiff` vector at the lock's hook, and, when `analoglock-steer` has run there,
the scale it chose and the effect it measured (steer.json); from an analoglock `.safetensors`
vector it rewrites the same vector as GGUF; from a contrast steering run
(`analoglock-steer contrast=...`), `vector=<aggregator>` exports that aggregator's vector, stored
at the scale chosen on validation with the effect measured on test. Prints where the vector acts
and what it carries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from analoglock.cli._conf import CONF_PATH

STEER_FILE = "steer.json"  # analoglock-steer's report, written into the lock run directory
CONTRAST_VECTOR_FILE = (
    "vector-{}.safetensors"  # analoglock-steer contrast=... writes one per aggregator
)
# vector -> (steer.json arms to read, best first; the strength each arm reports)
STEER_ARMS = {"learned": (("lock",), "alpha"), "meandiff": (("meandiff_best", "meandiff"), "scale")}


def measured(run_dir: Path, vector: str) -> tuple[float | None, dict[str, Any] | None]:
    """(scale chosen on validation, test effect at it) from the run's steer.json, if it ran.

    The effect names its arm and positions: the lock arm is the map x + alpha (M(x) - x) at the
    chosen positions, which equals adding the `learned` vector only for a translation map;
    llama.cpp adds a control vector at every position.
    """
    path = run_dir / STEER_FILE
    if not path.exists():
        return None, None
    report = json.loads(path.read_text())
    names, key = STEER_ARMS[vector]
    selection, test = report.get("selection", {}), report.get("test", {})
    arm = next((a for a in names if a in selection), None)
    if arm is None or key not in selection[arm]:
        return None, None
    cells = test.get("summary", {}).get("arms", {}).get(arm, {})
    effect = {m: c.get("value") for m, c in cells.items() if isinstance(c, dict)}
    effect.update(arm=arm, positions=selection[arm].get("positions"), split=test.get("split"))
    return float(selection[arm][key]), effect


def model_hint(model: dict[str, Any]) -> str:
    """The llama.cpp architecture of an embedded model, else its spec."""
    from analoglock.model import EMBEDDED_MODELS

    spec = str(model.get("spec", ""))
    return EMBEDDED_MODELS[spec].llama_cpp_arch if spec in EMBEDDED_MODELS else spec


def from_lock_run(run_dir: Path, vector: str, scale: float | str):
    """A ControlVector from a lock run's `learned` / `meandiff` vector, with its provenance."""
    from analoglock.lock.export import load_artifact
    from analoglock.vectors import VectorError, control_vector

    if vector not in STEER_ARMS:
        raise VectorError(f"vector={vector!r}: a lock run exports {' or '.join(STEER_ARMS)}.")
    artifact = load_artifact(run_dir)
    best, effect = measured(run_dir, vector)
    cfg = artifact.cfg
    note = None
    if vector == "learned" and cfg["kind"] != "translation" and effect is not None:
        note = (
            f"best_scale and effect are the {cfg['kind']} map's, x + alpha (M(x) - x) at "
            "effect.positions; this vector is its mean displacement over training A rows"
        )
    return control_vector(
        {artifact.hook: artifact.vectors[vector]},
        model=cfg["model"],
        scale=(best if best is not None else 1.0) if scale == "best" else float(scale),
        model_hint=model_hint(cfg["model"]),
        source=f"lock:{vector} ({cfg['kind']} map)" if vector == "learned" else "lock:meandiff",
        data=cfg.get("dataset"),
        best_scale=best,
        effect=effect,
        extra={"run": str(run_dir.resolve()), "views": cfg.get("views"), "note": note},
    )


def contrast_vector_file(run_dir: Path, vector: str) -> tuple[Path, Path]:
    """(the vector file, the .gguf to write) of a contrast steering run's aggregator `vector`
    (`analoglock-steer contrast=...` writes vector-<aggregator>.safetensors beside steer.json)."""
    from analoglock.lock.export import ARTIFACT_FILE
    from analoglock.vectors import VectorError

    path = run_dir / CONTRAST_VECTOR_FILE.format(vector)
    if not path.is_file():
        found = sorted(p.name for p in run_dir.glob(CONTRAST_VECTOR_FILE.format("*")))
        raise VectorError(
            f"src={run_dir} holds no {ARTIFACT_FILE} (a lock run) and no {path.name}: "
            + (
                f"it holds {', '.join(found)}; give vector=<aggregator> of one of them."
                if found
                else "give a lock run directory, a contrast steering run (analoglock-steer "
                "contrast=...) or an analoglock .safetensors vector."
            )
        )
    return path, run_dir / f"controlvector-{vector}.gguf"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Everything `main` does but printing; returns what was written (tests call this)."""
    from analoglock.lock.export import ARTIFACT_FILE
    from analoglock.vectors import (
        VectorError,
        control_hook,
        load_safetensors,
        save_gguf,
        save_safetensors,
    )

    src = Path(str(cfg.src))
    default_out = None
    if src.is_dir() and not (src / ARTIFACT_FILE).exists():
        src, default_out = contrast_vector_file(src, str(cfg.vector))
    if src.is_dir():
        cv = from_lock_run(src, str(cfg.vector), cfg.scale)
        out = Path(cfg.out) if cfg.out else src / f"controlvector-{cfg.vector}.gguf"
    elif src.suffix == ".safetensors":
        cv = load_safetensors(src)
        if cfg.scale != "best":  # a vector file already holds its scale; rescale on request
            factor = float(cfg.scale) / float(cv.provenance.get("scale") or 1.0)
            cv.directions = {n: factor * v for n, v in cv.directions.items()}
            cv.provenance["scale"] = float(cfg.scale)
        out = Path(cfg.out) if cfg.out else default_out or src.with_suffix(".gguf")
    else:
        raise VectorError(
            f"src={src}: give a lock run directory (holding lock.safetensors) or an analoglock "
            ".safetensors vector."
        )
    if cfg.model_hint:
        cv.model_hint = str(cfg.model_hint)
    if out.suffix != ".gguf":
        raise VectorError(f"out={out}: a llama.cpp control vector is a .gguf file.")
    written = [str(save_gguf(cv, out))]
    if cfg.safetensors and src.suffix != ".safetensors":
        written.append(str(save_safetensors(cv, out.with_suffix(".safetensors"))))
    measured_at = cv.provenance.get("hooks", {})
    return {
        "written": written,
        "hooks": {
            f"direction.{n}": measured_at.get(str(n), control_hook(n))
            for n in sorted(cv.directions)
        },
        "model_hint": cv.model_hint,
        "provenance": cv.provenance,
    }


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="export_vector")
def main(cfg: DictConfig) -> None:
    """Export, then print where each direction acts and what the file records."""
    result = run(cfg)
    p = result["provenance"]
    for name, hook in result["hooks"].items():
        layer = name.split(".")[1]
        print(f"{name}: llama.cpp adds it to block {layer}'s output; measured at {hook}")
    print(
        f"scale {p.get('scale')} baked in (best measured: {p.get('best_scale')}); "
        f"source {p.get('source')}; data {p.get('data')}; model {p.get('model', {}).get('spec')}"
    )
    print("wrote " + ", ".join(result["written"]))


if __name__ == "__main__":
    main()
