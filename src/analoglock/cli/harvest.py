"""analoglock-harvest: harvest activations from the frozen model and print a summary."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from analoglock.activation_store import META_FILE, ActivationStore, HarvestError
from analoglock.activations import harvest_to_disk
from analoglock.atomic import check_out_dir, finite
from analoglock.cli._conf import CONF_PATH

log = logging.getLogger(__name__)


def domain_stats(store: ActivationStore) -> dict:
    """Per hook: rows and mean norm by domain side / class, and the cosine of the two groups' means.

    Streams shard by shard, so a corpus-sized harvest never has to fit in memory.
    """
    docs = store.docs()
    keys = [str(d.meta.get("domain") or d.meta.get("class") or "all") for d in docs]
    names = sorted(set(keys))
    group_of_doc = torch.tensor([names.index(k) for k in keys])
    out = {}
    for hook in store.hooks:
        sums = torch.zeros(len(names), store.meta["d_model"], dtype=torch.float64)
        norms = torch.zeros(len(names), dtype=torch.float64)
        counts = torch.zeros(len(names), dtype=torch.float64)
        for shard in store.iter_shards([hook]):
            x = shard[hook].double()
            g = group_of_doc[shard["doc"]]
            sums.index_add_(0, g, x)
            norms.index_add_(0, g, x.norm(dim=-1))
            counts.index_add_(0, g, torch.ones_like(norms[g]))
        per: dict[str, object] = {
            n: {"rows": int(c), "mean_norm": round(float(s / c), 3)}
            for n, c, s in zip(names, counts, norms, strict=True)
            if c > 0
        }
        if len(names) == 2 and bool((counts > 0).all()):
            means = sums / counts[:, None]
            cos = torch.nn.functional.cosine_similarity(means[0], means[1], dim=0)
            per[f"cos(mean {names[0]}, mean {names[1]})"] = round(float(cos), 4)
        out[hook] = per
    return out


def build(node: DictConfig):
    """hydra.utils.instantiate, raising the loader's own error (which names the file and line)
    instead of Hydra's wrapper around it."""
    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="harvest")
def main(cfg: DictConfig) -> None:
    """Load the model and data from config, harvest to `out_dir`, print a JSON summary."""
    hooks = cfg.hooks
    hooks = list(hooks) if isinstance(hooks, ListConfig) else [str(hooks)]
    # what the inputs alone decide fails before the model loads (7 s) and before out_dir exists
    check_out_dir(cfg.out_dir)
    docs = build(cfg.data)
    if not docs:
        raise HarvestError(f"data={cfg.data.get('name', cfg.data)} gave no documents; nothing to harvest.")  # fmt: skip
    positions = build(cfg.positions)
    t0 = time.perf_counter()
    model = hydra.utils.instantiate(cfg.model)
    t_load = time.perf_counter() - t0
    meta_path = Path(cfg.out_dir) / META_FILE
    tokens_before = json.loads(meta_path.read_text())["n_tokens_seen"] if meta_path.exists() else 0
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
    new_tokens = summary["n_tokens_seen"] - tokens_before  # only what this run computed
    summary["tokens_per_s"] = round(new_tokens / seconds, 1) if new_tokens and seconds > 0 else None
    summary["by_group"] = domain_stats(store)
    print(json.dumps(finite(summary), indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
