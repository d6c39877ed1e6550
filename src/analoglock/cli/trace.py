"""analoglock-trace: token chains and working backwards from a target token; trace.json + report.html.

Example: `analoglock-trace basis=runs/bases/pca128-l12 analysis=backwards 'target=" down"'
prompt_prefix=down/` (quote the whole override, or the shell eats the space; `target_id=N` names the
token by id instead). Refuses unknown analyses, multi-token targets and empty prompt sets.
"""

from __future__ import annotations

import json
import logging
from importlib.resources import files
from pathlib import Path

import hydra
from omegaconf import DictConfig

from analoglock.cli._conf import CONF_PATH

log = logging.getLogger(__name__)
ANALYSES = ("chains", "backwards", "both")


def prompts_path(name: str) -> str:
    """The shipped analogy prompts for `analogies`, else the name unchanged."""
    if name == "analogies":
        return str(files("analoglock") / "data" / "prompts" / "analogies.jsonl")
    return name


def target_text(tokenizer, target: str, target_id: int | None) -> str:
    """The target token as text: `target`, or the token `target_id` decoded (checked to round-trip)."""
    if target_id is None:
        return target
    text = tokenizer.decode([int(target_id)])
    if tokenizer.encode(text, add_special_tokens=False) != [int(target_id)]:
        raise SystemExit(f"target_id={target_id} decodes to {text!r}, which does not encode back to it.")  # fmt: skip
    return text


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="trace")
def main(cfg: DictConfig) -> None:
    """Check the arguments, load model, basis and prompts, run, write JSON and the report."""
    from analoglock.atomic import write_json
    from analoglock.bases import load_basis
    from analoglock.data import load_documents
    from analoglock.patching.backwards import trace_backwards
    from analoglock.patching.chains import trace_chains
    from analoglock.reports.chains import write_trace_report

    if cfg.analysis not in ANALYSES:
        raise SystemExit(f"analysis={cfg.analysis!r}; valid: {', '.join(ANALYSES)}")
    docs = load_documents(prompts_path(str(cfg.prompts)), split=cfg.split, side=cfg.side, limit=cfg.limit)  # fmt: skip
    if cfg.prompt_prefix:
        docs = [d for d in docs if d.id.startswith(str(cfg.prompt_prefix))]
    if not docs:
        raise SystemExit(f"prompts={cfg.prompts!r} (prefix {cfg.prompt_prefix!r}) gave no prompts.")  # fmt: skip
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(
        parents=True, exist_ok=True
    )  # now, so an unwritable out_dir fails before the work
    basis = load_basis(cfg.basis)
    model = hydra.utils.instantiate(cfg.model)
    target = target_text(model.tokenizer, str(cfg.target), cfg.get("target_id"))
    out: dict = {"basis": str(cfg.basis), "prompts": str(cfg.prompts)}
    if cfg.analysis in ("backwards", "both"):
        out["backwards"] = trace_backwards(model, basis, docs, target, k=cfg.k, and_or_k=cfg.and_or_k, route_k=cfg.route_k, min_jaccard=cfg.min_jaccard, kill=cfg.kill, seed=cfg.seed, max_length=cfg.max_length, progress=cfg.progress)  # fmt: skip
    if cfg.analysis in ("chains", "both"):
        out["chains"] = trace_chains(model, basis, docs, n_features=cfg.n_features, k_tokens=cfg.k_tokens, n_controls=cfg.n_controls, z_min=cfg.z_min, seed=cfg.seed, max_length=cfg.max_length, progress=cfg.progress)  # fmt: skip
    write_json(out_dir / "trace.json", out)
    write_trace_report(out_dir / "report.html", out.get("chains"), out.get("backwards"))
    print(json.dumps({k: v for k, v in out.get("backwards", {}).items() if k in ("target", "n_prompts", "dropped")}, indent=2))  # fmt: skip
    print(f"wrote {out_dir}/trace.json, report.html")


if __name__ == "__main__":
    main()
