"""Fit a feature basis on a stored harvest and measure it: reconstruction on held-out documents,
and the model's next-token loss with the reconstruction spliced in (CE increase in nats, CE
recovered against zero- and mean-ablation), each with a bootstrap interval over held-out documents;
the per-document numbers behind them are saved, so two bases fit on the same harvest can be
compared paired over the same documents (`paired_difference`).

Owns which rows a basis is fit on. A harvest of a domain-pair dataset is fit on its train split
only (`split="auto"`), so a basis under a lock never saw the lock's held-out stories; other
harvests hold out whole documents at random. Refuses an incomplete harvest unless asked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analoglock.activation_store import Activations, ActivationStore, HarvestError
from analoglock.atomic import check_out_dir, write_json
from analoglock.bases import (
    basis_class,
    build_basis,
    check_basis_matches,
    load_basis,
    read_basis_cfg,
)
from analoglock.bases.quality import (
    BOOT_LEVEL,
    BOOT_N,
    BOOT_SEED,
    HELDOUT_RATIOS,
    fvu_per_doc,
    heldout_intervals,
    heldout_ratio,
    ratio_draws,
    ratio_spec,
    splice_quality_per_doc,
)
from analoglock.model import model_info
from analoglock.stats import bootstrap_indices, percentile_interval

log = logging.getLogger(__name__)

SPLITS = ("auto", "train", "all")  # auto: train for a domain-pair harvest, else all
TRAIN = "train"
CCA_TOP = 10  # canonical pairs reported
PER_DOC_FILE = "heldout_per_doc.json"  # beside metrics.json: the held-out numbers per document
PER_DOC_VERSION = 1


def split_documents(
    n_docs: int, holdout_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks over documents (train, held out): whole documents, never tokens, are held out."""
    perm = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, int(round(n_docs * holdout_fraction))) if n_docs > 1 else 0
    held = torch.zeros(n_docs, dtype=torch.bool)
    held[perm[:n_hold]] = True
    return ~held, held


def is_pair_harvest(docs) -> bool:
    """Whether the harvested documents come from a domain-pair dataset (each has a pair and split)."""
    return bool(docs) and all("pair" in d.meta and "split" in d.meta for d in docs)


def resolve_split(split: str | None, docs) -> str:
    """ "train" or "all": `auto` is train for a domain-pair harvest; train needs split metadata."""
    split = "all" if split is None else str(split)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "auto":
        has_train = any(d.meta.get("split") == TRAIN for d in docs)
        if is_pair_harvest(docs) and not has_train:
            log.warning("This domain-pair harvest holds no train-split document: fitting on all")
        return TRAIN if is_pair_harvest(docs) and has_train else "all"
    if split == TRAIN and not all("split" in d.meta for d in docs):
        raise ValueError(
            "split=train needs a harvest of a dataset with splits (a domain-pair or concept set); "
            "this harvest's documents carry none. Use split=all."
        )
    return split


def fit_documents(
    docs, split: str, holdout_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks over documents (fit on, held out for quality numbers).

    split="train": fit on the train split's documents, held out = every other split's (or, for a
    harvest of the train split alone, a random `holdout_fraction` of its documents)."""
    if split != TRAIN:
        return split_documents(len(docs), holdout_fraction, seed)
    train = torch.tensor([d.meta["split"] == TRAIN for d in docs])
    if not train.any():
        raise ValueError("split=train: the harvest holds no document of the train split.")
    if train.all():
        idx = train.nonzero().flatten()
        fit, held = split_documents(len(idx), holdout_fraction, seed)
        return train & _scatter(idx, fit, len(docs)), _scatter(idx, held, len(docs))
    return train, ~train


def _scatter(idx: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    out[idx[mask]] = True
    return out


def check_finite_rows(x: torch.Tensor, acts: Activations, hook: str) -> None:
    """Refuse NaN/inf rows, naming the first one's harvest row, document and token position."""
    bad = ~torch.isfinite(x).all(dim=-1)
    if bad.any():
        r = int(bad.nonzero()[0])
        doc = acts.docs[int(acts.doc[r])].id if acts.docs else int(acts.doc[r])
        raise FloatingPointError(
            f"{int(bad.sum())} of {len(x)} activation rows at {hook} hold NaN or inf (first: row "
            f"{r}, document {doc!r}, token {int(acts.pos[r])}); the harvest is broken (check the "
            "model dtype) or the rows need filtering before a basis can be fit."
        )


def open_harvest(
    acts_dir: str | Path, kind: str, out_dir: str | Path, hook: str | None = None,
    allow_incomplete: bool = False,
) -> tuple[ActivationStore, str]:  # fmt: skip
    """The checks that need only the inputs, before any model loads: a readable, complete
    harvest holding `hook`, a known basis kind, and an out_dir that can be a directory."""
    basis_class(kind)
    check_out_dir(out_dir)
    store = ActivationStore(acts_dir)
    if not allow_incomplete:
        store.require_complete()
    elif not store.complete:
        log.warning("Fitting on the %d rows of the incomplete harvest %s", len(store), acts_dir)
    hook = hook or store.hooks[0]
    if hook not in store.hooks:
        raise HarvestError(f"Hook {hook!r} is not in the harvest {acts_dir}; it has {store.hooks}.")
    if len(store) == 0:
        raise HarvestError(f"The harvest {acts_dir} holds no rows.")
    return store, hook


def cca_fit_and_eval(
    basis, paired, seed: int = 0, top: int = CCA_TOP, fit_split: str = "all"
) -> dict[str, Any]:
    """Fit CCA on paired rows; correlations on held-out test pairs beside deranged partners.

    In-sample canonical correlations of a few hundred pairs in hundreds of dims are ~1 whatever
    the data: only held-out correlations, next to those of deranged partners, say anything. The
    control re-pairs rows within their view (story with story, role with role): a story-with-role
    mispairing is wrong for a trivial reason. Correlations are also given per view, centred
    within the view, since a pooled correlation can come from the story means and the role
    tokens lying apart rather than from what pairs them. `fit_split="train"` fits on the train
    split only (validation is left to the lock's model selection); "all" on every non-test pair.
    """
    from analoglock.bases.cca import variate_correlations
    from analoglock.paired import view_group
    from analoglock.stats import derange_within

    held_rows = [s == "test" for s in paired.split]
    fit_rows = [(s == TRAIN) if fit_split == TRAIN else (s != "test") for s in paired.split]
    if all(held_rows) or not any(held_rows) or not any(fit_rows):
        # a harvest of one split: hold out whole pairs ourselves
        ids = sorted(set(paired.pair))
        _, held_ids = split_documents(len(ids), 0.2, seed)
        held_set = {i for i, h in zip(ids, held_ids.tolist(), strict=True) if h}
        held_rows = [p in held_set for p in paired.pair]
        fit_rows = [not h for h in held_rows]
    held_idx = torch.tensor([i for i, h in enumerate(held_rows) if h])
    fit_idx = torch.tensor([i for i, f in enumerate(fit_rows) if f])
    basis.fit_pair(paired.a[fit_idx], paired.b[fit_idx])
    groups = [view_group(paired.view[i]) for i in held_idx.tolist()]
    gen = torch.Generator().manual_seed(seed)

    def scores(rows: torch.Tensor, views: list[str]) -> dict[str, Any]:
        a, b = paired.a[rows], paired.b[rows]
        held = variate_correlations(basis, a, b)
        control = variate_correlations(basis, a, b[derange_within(views, gen)])
        return {
            "n_pairs": len(rows),
            "canonical_correlations": held.tolist()[:top],
            "shuffled_control": control.tolist()[:top],
            "mean_correlation_top": float(held[:top].mean()),
            "mean_correlation_top_shuffled_control": float(control[:top].mean()),
        }

    pooled = scores(held_idx, groups)
    by_view = {}
    for g in sorted(set(groups)):
        rows = held_idx[torch.tensor([v == g for v in groups])]
        if len(rows) >= 3:  # a correlation (and a derangement) needs a few rows
            by_view[g] = scores(rows, [g] * len(rows))
    return {
        "canonical_correlations_in_sample": basis.canonical_correlations.tolist()[:top],
        "heldout/canonical_correlations": pooled["canonical_correlations"],
        "heldout/canonical_correlations_shuffled_control": pooled["shuffled_control"],
        "heldout/mean_correlation_top": pooled["mean_correlation_top"],
        "heldout/mean_correlation_top_shuffled_control": pooled[
            "mean_correlation_top_shuffled_control"
        ],
        "heldout/by_view": by_view,
        "control": "partners deranged within each view (story with story, role with role)",
        "fit_split": fit_split,
        "n_pairs": {"fit": len(fit_idx), "heldout": len(held_idx)},
    }


def fit_basis_on_store(
    acts_dir: str | Path,
    kind: str,
    n_features: int,
    out_dir: str | Path,
    hook: str | None = None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    model=None,
    splice_docs: int = 32,
    basis_kwargs: dict[str, Any] | None = None,
    split: str | None = "auto",
    allow_incomplete: bool = False,
    n_boot: int = BOOT_N,
    boot_seed: int = BOOT_SEED,
) -> dict[str, Any]:
    """Fit `kind` with `n_features` on a harvest, save it to `out_dir`, and return its metrics.

    `split`: "auto" (train for a domain-pair harvest, else all), "train" or "all" (documents
    held out at random, `holdout_fraction` of them). An incomplete harvest is refused unless
    `allow_incomplete`. Held-out FVU and the spliced CE numbers get `_ci95` intervals from
    `n_boot` resamples of the held-out documents (seed `boot_seed`; `heldout/bootstrap` records
    both and how many documents each number rests on); the per-document sums go to
    `heldout_per_doc.json`.
    """
    store, hook = open_harvest(acts_dir, kind, out_dir, hook, allow_incomplete)
    rows = HarvestSplit.load(store, hook, split, holdout_fraction, seed)
    x, acts, train_rows = rows.x, rows.acts, rows.train_rows
    basis = build_basis(kind, n_components=n_features, hook=hook, **(basis_kwargs or {}))
    if kind == "cca":
        from analoglock.paired import pool_pairs

        paired = pool_pairs(acts, hook, ("story", "roles"))
        metrics: dict[str, Any] = cca_fit_and_eval(basis, paired, seed, fit_split=rows.split)
    elif kind == "sae":  # positions let the SAE trainer drop BOS rows; it reports its run
        basis.fit(x[train_rows], pos=acts.pos[train_rows])
        metrics = {"sae_training": basis.train_stats}
    else:
        basis.fit(x[train_rows])
        metrics = {}
    metrics.update({f"train/{k}": v for k, v in basis.quality(x[train_rows]).items()})
    splice = splice_docs if kind != "cca" else 0
    measured, per_doc = _measure_heldout(basis, store, rows, model, splice, n_boot, boot_seed)
    metrics.update(measured)
    metrics.update(
        {"kind": kind, "hook": hook, "n_features": basis.n_features, "acts": str(acts_dir)}
    )
    metrics.update(rows.record())
    basis.save(out_dir, model=store.meta["model"])
    _write_measures(out_dir, metrics, per_doc, seed, holdout_fraction)
    return metrics


def evaluate_basis_on_store(
    basis_dir: str | Path,
    acts_dir: str | Path,
    out_dir: str | Path,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    model=None,
    splice_docs: int = 32,
    split: str | None = "auto",
    allow_incomplete: bool = False,
    n_boot: int = BOOT_N,
    boot_seed: int = BOOT_SEED,
) -> dict[str, Any]:
    """Measure a saved basis on another harvest's held-out documents, as if it had been fit there.

    The documents are the ones `fit_basis_on_store` would hold out with the same split,
    holdout_fraction and seed (a domain-pair harvest: every split but train), and mean ablation
    takes the mean of that harvest's fit rows, so the metrics pair with a basis fit on it
    (`paired_difference`): e.g. an SAE trained on the generated corpus, measured on the fable_work
    stories a lock is tested on, beside PCA fit on their train split. Writes metrics.json and
    heldout_per_doc.json to `out_dir` (not the basis: it stays where it is).
    """
    store, hook = open_evaluation(basis_dir, acts_dir, out_dir, allow_incomplete)
    basis = load_basis(basis_dir)
    rows = HarvestSplit.load(store, hook, split, holdout_fraction, seed)
    if not rows.held_rows.any():
        raise ValueError(f"The harvest {acts_dir} leaves no held-out document to measure on (split={split}).")  # fmt: skip
    metrics, per_doc = _measure_heldout(basis, store, rows, model, splice_docs, n_boot, boot_seed)
    metrics.update({"kind": basis.kind, "hook": hook, "n_features": basis.n_features,
                    "acts": str(acts_dir), "evaluated_basis": str(basis_dir)})  # fmt: skip
    metrics.update(rows.record())
    _write_measures(out_dir, metrics, per_doc, seed, holdout_fraction)
    return metrics


def open_evaluation(
    basis_dir: str | Path, acts_dir: str | Path, out_dir: str | Path, allow_incomplete: bool = False
) -> tuple[ActivationStore, str]:
    """What the inputs alone decide before a basis is measured on a harvest: a readable basis,
    a complete harvest holding its hook, made on the basis's model, and a usable out_dir."""
    cfg = read_basis_cfg(basis_dir)
    if cfg.get("kind") == "cca":
        raise ValueError(
            f"{basis_dir} is a CCA basis: it pairs two domains' rows and is measured by held-out "
            "canonical correlations, not by reconstruction; fit it on this harvest (basis=cca) instead."
        )
    store, hook = open_harvest(acts_dir, cfg.get("kind", ""), out_dir, cfg.get("hook"), allow_incomplete)  # fmt: skip
    check_basis_matches(basis_dir, store.meta.get("model", {}).get("sha256"), hook)
    return store, hook


@dataclass(frozen=True)
class HarvestSplit:
    """A harvest's rows at one hook and which documents a basis is fit on and held out on."""

    acts: Activations
    x: torch.Tensor  # [rows, d_model] float32
    split: str  # "train" or "all" (resolved)
    train_docs: torch.Tensor  # bool [docs]
    held_docs: torch.Tensor  # bool [docs]

    @classmethod
    def load(cls, store: ActivationStore, hook: str, split, holdout_fraction: float, seed: int) -> HarvestSplit:  # fmt: skip
        acts = store.load([hook])
        x = acts.acts[hook].float()
        check_finite_rows(x, acts, hook)
        split = resolve_split(split, acts.docs)
        train_docs, held_docs = fit_documents(acts.docs, split, holdout_fraction, seed)
        return cls(acts, x, split, train_docs, held_docs)

    @property
    def train_rows(self) -> torch.Tensor:
        return self.train_docs[self.acts.doc]

    @property
    def held_rows(self) -> torch.Tensor:
        return self.held_docs[self.acts.doc]

    def record(self) -> dict[str, Any]:
        """The split, and how many documents and rows each side holds (for metrics.json)."""
        train_rows, held_rows = self.train_rows, self.held_rows
        return {
            "split": self.split,
            "n_docs": {"fit": int(self.train_docs.sum()), "heldout": int(self.held_docs.sum())},
            "n_rows": {"train": int(train_rows.sum()), "heldout": int(held_rows.sum())},
        }


def _measure_heldout(basis, store, rows: HarvestSplit, model, splice_docs: int, n_boot: int, boot_seed: int):  # fmt: skip
    """Held-out quality, per-document FVU, spliced CE (with a model) and their intervals."""
    acts, held_rows = rows.acts, rows.held_rows
    metrics: dict[str, Any] = {}
    per_doc: dict[str, Any] = {}
    if held_rows.any():
        held = rows.x[held_rows]
        metrics.update({f"heldout/{k}": v for k, v in basis.quality(held).items()})
        ids = [d.id for d in acts.docs] if acts.docs else None
        per_doc["fvu"] = fvu_per_doc(held, basis.reconstruct(held), acts.doc[held_rows], ids)
    if model is not None and splice_docs > 0:
        if model_info(model).sha256 != store.meta["model"]["sha256"]:
            raise ValueError(
                f"The harvest in {store.path} was made on {store.meta['model']['spec']!r}, not on the "
                f"loaded model {model_info(model).spec!r}; spliced loss needs the same model."
            )
        held_docs = rows.held_docs.tolist()
        docs = [d for d, h in zip(acts.docs, held_docs, strict=True) if h][:splice_docs]
        mean = (
            rows.x[rows.train_rows & (acts.pos > 0)].double().mean(0)
        )  # mean ablation: fit tokens
        summary, per_doc["ce"] = splice_quality_per_doc(
            model, docs, basis.hook, basis.forward, mean=mean
        )
        metrics.update({f"heldout/{k}": v for k, v in summary.items()})
    metrics.update({f"heldout/{k}": v for k, v in heldout_intervals(per_doc, n_boot, boot_seed).items()})  # fmt: skip
    return metrics, per_doc


def _write_measures(out_dir, metrics: dict[str, Any], per_doc: dict[str, Any], seed: int, holdout_fraction: float) -> None:  # fmt: skip
    """metrics.json and, with held-out documents, heldout_per_doc.json (never a stale one)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if per_doc:
        provenance = {k: metrics[k] for k in ("kind", "hook", "n_features", "acts", "split")}
        write_json(out / PER_DOC_FILE, {"version": PER_DOC_VERSION, **provenance, "seed": seed,
                                        "holdout_fraction": holdout_fraction, **per_doc})  # fmt: skip
    else:  # never leave an older fit's documents beside this fit's metrics
        (out / PER_DOC_FILE).unlink(missing_ok=True)
    write_json(out / "metrics.json", metrics)


# ---------------------------------------------------------------- comparing two fits, paired


def read_per_doc(metrics_dir: str | Path) -> dict[str, Any]:
    """The per-document held-out numbers `fit_basis_on_store` saved in `metrics_dir`."""
    path = Path(metrics_dir) / PER_DOC_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{metrics_dir} has no {PER_DOC_FILE}: it is not the out_dir of a fit with held-out "
            "documents, or was fit before per-document numbers were saved (fit it again)."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _aligned_section(a_dir, b_dir, a: dict, b: dict, section: str) -> tuple[dict, dict]:
    """Section `section` of both files, b's documents put in a's order; refuses other documents."""
    for d, got in ((a_dir, a), (b_dir, b)):
        if section not in got:
            how = " and spliced CE (a model and splice_docs > 0)" if section == "ce" else ""
            raise ValueError(f"{d} has no per-document {section!r} numbers: fit it with held-out documents{how}.")  # fmt: skip
        ids = got[section]["doc_ids"]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{d}: document ids repeat in its {section!r} numbers; they cannot be paired.")  # fmt: skip
    ids_a, ids_b = a[section]["doc_ids"], b[section]["doc_ids"]
    if set(ids_a) != set(ids_b):
        only_a, only_b = sorted(set(ids_a) - set(ids_b)), sorted(set(ids_b) - set(ids_a))
        raise ValueError(
            f"{a_dir} and {b_dir} measured {section!r} on different held-out documents "
            f"({len(ids_a)} vs {len(ids_b)}; {len(only_a)} only in {a_dir}, e.g. {only_a[:3]}; "
            f"{len(only_b)} only in {b_dir}, e.g. {only_b[:3]}): a paired comparison needs both fit "
            "on the same harvest with the same split, holdout_fraction, seed and splice_docs."
        )
    where = {doc: i for i, doc in enumerate(ids_b)}
    order = [where[doc] for doc in ids_a]
    b_sec = {k: [v[i] for i in order] if isinstance(v, list) else v for k, v in b[section].items()}
    count = "n_tokens" if section == "ce" else "n_rows"
    if a[section].get(count) != b_sec.get(count):
        raise ValueError(
            f"{a_dir} and {b_dir} hold the same documents but different {count} per document: "
            "they were measured on other tokens (another harvest, hook or max_length)."
        )
    return a[section], b_sec


def paired_difference(
    metrics_dir_a: str | Path,
    metrics_dir_b: str | Path,
    key: str,
    n_boot: int = BOOT_N,
    seed: int = BOOT_SEED,
) -> dict[str, Any]:
    """A held-out statistic of fit A minus that of fit B, with a paired bootstrap interval.

    `key`: fvu, ce_increase, ce_recovered or ce_recovered_vs_mean ("heldout/" may prefix it).
    Both fits must hold per-document numbers for the same documents (else a ValueError names both
    directories); every draw resamples those documents once and recomputes both statistics on
    that one resample, so the interval is of the difference on shared documents. Values are
    recomputed from the per-document sums (float64), equal to metrics.json's to rounding.
    """
    key = key.removeprefix("heldout/")
    section = ratio_spec(key)[0]
    a, b = read_per_doc(metrics_dir_a), read_per_doc(metrics_dir_b)
    sec_a, sec_b = _aligned_section(metrics_dir_a, metrics_dir_b, a, b, section)
    num_a, den_a = heldout_ratio({section: sec_a}, key)
    num_b, den_b = heldout_ratio({section: sec_b}, key)
    n = len(num_a)
    value_a, value_b = float(num_a.sum() / den_a.sum()), float(num_b.sum() / den_b.sum())

    def diff(idx: torch.Tensor) -> torch.Tensor:
        return ratio_draws(num_a, den_a, idx) - ratio_draws(num_b, den_b, idx)

    lo, hi = percentile_interval(diff(bootstrap_indices(n, n_boot, seed)), BOOT_LEVEL)
    return {
        "key": f"heldout/{key}",
        "a": str(metrics_dir_a),
        "b": str(metrics_dir_b),
        "value_a": value_a,
        "value_b": value_b,
        "difference": value_a - value_b,  # a - b
        "ci95": [lo, hi],
        "n_docs": n,
        "n_boot": n_boot,
        "seed": seed,
        "unit": "held-out document, one resample for both fits (paired)",
    }


def comparable_keys(metrics_dir_a: str | Path, metrics_dir_b: str | Path) -> list[str]:
    """The statistics both fits hold per-document numbers for."""
    a, b = read_per_doc(metrics_dir_a), read_per_doc(metrics_dir_b)
    return [k for k, (sec, _, _) in HELDOUT_RATIOS.items() if sec in a and sec in b]
