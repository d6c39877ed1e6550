"""analoglock-compare-bases: match two saved bases and decompose the wider into the narrower."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from analoglock.cli._conf import CONF_PATH


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="compare_bases")
def main(cfg: DictConfig) -> None:
    """Load both bases, refuse different models, write compare.json and compare.html."""
    from analoglock.atomic import check_out_dir, write_json
    from analoglock.bases import check_basis_matches, load_basis, read_basis_cfg
    from analoglock.bases.compare import compare_bases
    from analoglock.reports.bases import compare_report

    out = check_out_dir(cfg.out_dir)
    few_cfg = read_basis_cfg(cfg.few)
    check_basis_matches(cfg.many, (few_cfg.get("model") or {}).get("sha256"))
    few, many = load_basis(cfg.few), load_basis(cfg.many)
    result = compare_bases(few, many, l1=cfg.l1, steps=cfg.steps, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    compare_report(result, out / "compare.html", f"{cfg.few} vs {cfg.many}")
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    write_json(out / "compare.json", public)
    print(json.dumps({k: v for k, v in public.items() if k != "matched_cosines"}, indent=2)[:4000])
    print(f"wrote {out}/compare.json and compare.html")


if __name__ == "__main__":
    main()
