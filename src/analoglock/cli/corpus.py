"""analoglock-corpus: sample a cached general-text corpus from the frozen model, print a summary.

Example: `analoglock-corpus n_tokens=1000000 seed=1` (rerunning extends or reuses the same file).
"""

from __future__ import annotations

import json
import logging
import time

import hydra
from omegaconf import DictConfig

from analoglock.cli._conf import CONF_PATH
from analoglock.corpus import check_choices, corpus_stats, default_corpus_path, generate_corpus

log = logging.getLogger(__name__)


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="corpus")
def main(cfg: DictConfig) -> None:
    """Load the model from config, grow the corpus to `n_tokens`, print a one-line JSON summary."""
    check_choices(cfg.sampler, cfg.decoder)  # before the model loads
    model = hydra.utils.instantiate(cfg.model)
    path = cfg.out_path or default_corpus_path(model, cfg.seed)
    _, before = corpus_stats(path)
    t0 = time.perf_counter()
    path = generate_corpus(
        model,
        n_tokens=cfg.n_tokens,
        seed=cfg.seed,
        out_path=path,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        repetition_penalty=cfg.repetition_penalty,
        progress=cfg.get("progress", True),
        sampler=cfg.sampler,
        decoder=cfg.decoder,
    )
    seconds = time.perf_counter() - t0
    n_docs, n_tokens = corpus_stats(path)
    made = n_tokens - before  # tokens sampled by this run, not those already on disk
    summary = {
        "path": str(path),
        "n_docs": n_docs,
        "n_tokens": n_tokens,
        "new_tokens": made,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(made / seconds, 1) if made and seconds > 0 else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
