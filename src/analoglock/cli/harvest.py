"""analoglock-harvest: harvest activations from the frozen model and print a summary."""

from __future__ import annotations

import json
import logging
import time

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from analoglock.activations import ActivationStore, harvest_to_disk
from analoglock.cli._conf import CONF_DIR

log = logging.getLogger(__name__)


def domain_stats(store: ActivationStore) -> dict:
    """Per-hook row counts and mean norms by domain side / class, and the cosine of their means."""
    acts = store.load()
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(acts.docs):
        key = d.meta.get("side") or d.meta.get("class") or "all"
        groups.setdefault(str(key), []).append(i)
    out = {}
    for hook, x in acts.acts.items():
        x = x.float()
        per: dict[str, dict] = {}
        means = {}
        for key, doc_ids in groups.items():
            rows = torch.isin(acts.doc, torch.tensor(doc_ids))
            if rows.any():
                means[key] = x[rows].mean(0)
                per[key] = {
                    "rows": int(rows.sum()),
                    "mean_norm": round(float(x[rows].norm(dim=-1).mean()), 3),
                }
        keys = list(means)
        if len(keys) == 2:
            cos = torch.nn.functional.cosine_similarity(means[keys[0]], means[keys[1]], dim=0)
            per[f"cos(mean {keys[0]}, mean {keys[1]})"] = round(float(cos), 4)
        out[hook] = per
    return out


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="harvest")
def main(cfg: DictConfig) -> None:
    """Load the model and data from config, harvest to `out_dir`, print a JSON summary."""
    hooks = cfg.hooks
    hooks = list(hooks) if isinstance(hooks, ListConfig) else [str(hooks)]
    t0 = time.perf_counter()
    model = hydra.utils.instantiate(cfg.model)
    t_load = time.perf_counter() - t0
    docs = hydra.utils.instantiate(cfg.data)
    positions = hydra.utils.instantiate(cfg.positions)
    t1 = time.perf_counter()
    store = harvest_to_disk(
        model,
        docs,
        hooks,
        cfg.out_dir,
        positions=positions,
        dataset=str(cfg.data.get("name", "")),
        batch_tokens=cfg.batch_tokens,
        max_length=cfg.max_length,
        shard_rows=cfg.shard_rows,
        store_dtype=cfg.store_dtype,
        progress=cfg.progress,
        extra_meta={"config": OmegaConf.to_container(cfg, resolve=True)},
    )
    seconds = time.perf_counter() - t1
    summary = store.summary()
    summary["load_s"] = round(t_load, 2)
    summary["harvest_s"] = round(seconds, 2)
    summary["tokens_per_s"] = round(summary["n_tokens_seen"] / seconds, 1) if seconds > 0 else None
    summary["by_group"] = domain_stats(store)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
