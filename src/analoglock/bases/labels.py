"""Feature labels written by the model itself, each scored by how well it detects its feature.

Owns: choosing each feature's explain / held-out contexts and non-activating negatives, the
labeling prompt (top contexts with the activating token marked, answered greedily through the chat
template), the detection question ("does the marked token match this label?") scored as the
log-odds of Yes over No from one forward pass per batch, the shuffled-label control (every feature
asked about with another feature's label, a derangement), the metrics (AUROC, balanced accuracy,
and the contrast: own-label minus shuffled-label score on the same contexts), and `labels.json`
beside a saved basis. Knows nothing of HTML or how the basis was fit; token
windows come from `bases.contexts`, decoding from `generation`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_recall,
    binary_specificity,
)
from tqdm.auto import tqdm

from analoglock.atomic import write_json
from analoglock.bases.base import ACTIVE_EPS, BASIS_FILE, read_basis_cfg
from analoglock.bases.contexts import Context, feature_codes, random_contexts, top_contexts
from analoglock.generation import chat_prompt, generate
from analoglock.tokens import check_lengths, encode_texts, pad_ids

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
LABELS_VERSION = 1
MARK = "<<{}>>"  # how the activating token is shown to the model
YES, NO = ("Yes", " Yes"), ("No", " No")  # both spellings are single SmolLM2 tokens
MAX_LABEL_WORDS = 5
MAX_LABEL_CHARS = 48
FALLBACK_WORDS = 3  # a label that cleans to nothing becomes the commonest marked words

LABEL_PROMPT = (
    "In each excerpt below, one word is marked like <<this>>.\n\n{examples}\n\n"
    "The marked words are: {words}.\n"
    "Give a short label, a few words long, for what the marked words have in common."
)
# Starts the answer, so a 135M model labels instead of echoing an excerpt. Bullets, not numbers,
# and no digits in the request: with "1." in sight SmolLM2 answers "1. <first excerpt>".
LABEL_PREFILL = "Label:"
DETECT_PROMPT = (
    'Label: "{label}"\n'
    "Text: {text}\n\n"
    "Does the marked word <<{token}>> in this text fit the label? Answer Yes or No."
)


class LabelsMismatchError(ValueError):
    """labels.json made with another model, hook or fit of the basis than the one asked about."""


@dataclass
class FeatureExamples:
    """One feature's contexts: shown to the labeler, and held out to score its label."""

    feature: int
    explain: list[Context]  # best first
    positives: list[Context]  # held-out top contexts
    negatives: list[Context]  # random non-activating contexts, as many as positives


# --- choosing contexts ----------------------------------------------------------------------------


def inactive_threshold(values: Annotated[Tensor, "n_rows"]) -> float:
    """Codes at or below this count as non-activating: the median, or ~0 for a sparse feature."""
    return max(float(values.float().median()), ACTIVE_EPS)


def near_rows(acts, rows: Sequence[int], radius: int) -> Tensor:
    """Rows of the same document within `radius` positions of any of `rows` (a bool mask)."""
    mask = torch.zeros(len(acts), dtype=torch.bool)
    for r in rows:
        same = acts.doc == acts.doc[r]
        mask |= same & ((acts.pos - acts.pos[r]).abs() <= radius)
    return mask


def split_counts(n_found: int, n_explain: int, n_detect: int) -> tuple[int, int]:
    """(explain, detect) sizes from n_found top contexts; detection gets at most half of a short list."""
    n_det = min(n_detect, n_found // 2)
    return min(n_explain, n_found - n_det), n_det


def gather_examples(
    codes: Annotated[Tensor, "n_rows n_features"],
    acts,
    tokenizer,
    features: Sequence[int],
    n_explain: int = 8,
    n_detect: int = 8,
    seed: int = 0,
    window: tuple[int, int] = (12, 3),
) -> dict[int, FeatureExamples]:
    """Split each feature's top contexts at random into explain / held-out, and draw negatives."""
    k = n_explain + n_detect
    # Twice as many as needed: distinct documents can share a window's text, and a repeat split
    # across explain and held-out would leak the answer.
    tops = top_contexts(codes, acts, tokenizer, k=2 * k, window=window, features=features)
    out = {}
    for f in features:
        found = distinct_texts(tops[f])[:k]
        n_exp, n_det = split_counts(len(found), n_explain, n_detect)
        gen = torch.Generator().manual_seed(feature_seed(seed, f))
        order = torch.randperm(len(found), generator=gen).tolist()
        explain = sorted((found[i] for i in order[:n_exp]), key=lambda c: -c.value)
        positives = [found[i] for i in order[n_exp : n_exp + n_det]]
        values = codes[:, f]
        # Negatives neither fire nor sit in a top context's window (the window would show it).
        blocked = (values > inactive_threshold(values)) | near_rows(
            acts, [c.row for c in found], sum(window)
        )
        n_neg = min(len(positives), int((~blocked).sum()))
        negatives = random_contexts(
            acts, tokenizer, n_neg, feature_seed(seed, f), window, blocked, values
        )
        out[f] = FeatureExamples(f, explain, positives, negatives)
    return out


def distinct_texts(contexts: Sequence[Context]) -> list[Context]:
    """Contexts with a repeated marked text dropped (first kept)."""
    seen: set[str] = set()
    out = []
    for c in contexts:
        t = c.text(MARK)
        if t not in seen:
            seen.add(t)
            out.append(c)
    return out


def feature_seed(seed: int, feature: int) -> int:
    """A per-feature seed, so a feature's draws do not depend on which others are labeled."""
    return int(seed) * 1_000_003 + int(feature)


# --- labeling -------------------------------------------------------------------------------------


def marked_words(contexts: Sequence[Context]) -> list[str]:
    """The distinct activating tokens of the contexts, stripped, in order."""
    words: list[str] = []
    for c in contexts:
        w = c.tokens[c.highlight].strip() or c.tokens[c.highlight]
        if w not in words:
            words.append(w)
    return words


def label_prompt(model, contexts: Sequence[Context]) -> str:
    """The chat-templated request for a label: the excerpts, then their marked words listed."""
    if not contexts:
        raise ValueError("label_prompt needs at least one context")
    examples = "\n".join(f"- {c.text(MARK).strip()}" for c in contexts)
    words = ", ".join(marked_words(contexts))
    return chat_prompt(model, LABEL_PROMPT.format(examples=examples, words=words)) + LABEL_PREFILL


_PREFIX = re.compile(  # numbering, "Label:", and "Marked words:" or a bare "The marked words"
    r"^\s*((\d+[.)]|[-*\u2022])\s*)*((the\s+)?label\s*(is)?\s*[:\-]?\s*)?"
    r"((the\s+)?marked\s+words?\s*(:|$)\s*)?",
    re.I,
)
_STRIP = " \t\"'`*_\u201c\u201d\u2018\u2019.,;:!?()[]{}<>"


def clean_label(
    text: str, max_words: int = MAX_LABEL_WORDS, max_chars: int = MAX_LABEL_CHARS
) -> str:
    """First line that survives cleaning (no numbering, 'Label:', quotes, end punctuation), capped; or ""."""
    for line in text.splitlines():
        line = line.replace("<<", "").replace(">>", "")
        for _ in range(2):  # quotes may wrap the prefix ('"Marked words"') or follow it
            line = _PREFIX.sub("", line).strip(_STRIP)
        line = " ".join(line.split()[:max_words]).strip(_STRIP)
        if len(line) > max_chars:
            cut = line[:max_chars]
            line = (cut.rsplit(" ", 1)[0] if " " in cut else cut).strip(_STRIP)
        if line:
            return line
    return ""


def fallback_label(contexts: Sequence[Context], n: int = FALLBACK_WORDS) -> str:
    """The n commonest marked words (first seen wins ties): the label when the model gives none."""
    words = [c.tokens[c.highlight].strip() or c.tokens[c.highlight] for c in contexts]
    counts = Counter(words)
    return ", ".join(sorted(counts, key=lambda w: (-counts[w], words.index(w)))[:n])


# --- detection scoring ----------------------------------------------------------------------------


def detect_prompt(model, label: str, context: Context) -> str:
    """The chat-templated Yes/No question: does this context's marked token fit `label`?"""
    token = context.tokens[context.highlight].strip() or context.tokens[context.highlight]
    return chat_prompt(
        model, DETECT_PROMPT.format(label=label, text=context.text(MARK).strip(), token=token)
    )


def answer_ids(tokenizer, spellings: Sequence[str]) -> list[int]:
    """The single token id of each spelling, or a clear error if one is not a single token."""
    ids = []
    for s in spellings:
        enc = tokenizer.encode(s, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(
                f"{s!r} is {len(enc)} tokens in this tokenizer ({enc}); detection scoring reads "
                "one next-token logit per answer, so each spelling must be a single token"
            )
        ids.append(enc[0])
    return ids


def yes_no_logodds(
    logits: Annotated[Tensor, "batch d_vocab"], yes: Sequence[int], no: Sequence[int]
) -> Annotated[Tensor, "batch"]:
    """logsumexp over Yes spellings minus logsumexp over No spellings: log P(Yes)/P(No)."""
    return torch.logsumexp(logits[:, list(yes)], dim=-1) - torch.logsumexp(
        logits[:, list(no)], dim=-1
    )


@torch.no_grad()
def last_token_logits(model, prompts: Sequence[str]) -> Annotated[Tensor, "batch d_vocab"]:
    """Next-token logits after each prompt: one right-padded forward, unembedding only the last token."""
    rows = encode_texts(model, prompts)
    ids, mask = pad_ids(rows, model.tokenizer.pad_token_id, side="right")  # right: as unpadded
    hf = model.original_model
    device = model.cfg.device
    hidden = hf.base_model(
        input_ids=ids.to(device), attention_mask=mask.to(device)
    ).last_hidden_state
    last = mask.sum(dim=1) - 1
    h_last = hidden[torch.arange(len(rows), device=device), last.to(device)]
    return hf.get_output_embeddings()(h_last).float().cpu()


def score_questions(
    model, prompts: Sequence[str], batch_size: int = 16, progress: bool = False
) -> Annotated[Tensor, "n"]:
    """log P(Yes)/P(No) of each prompt's next token, batched by length (one forward per batch)."""
    yes, no = answer_ids(model.tokenizer, YES), answer_ids(model.tokenizer, NO)
    lengths = [len(r) for r in encode_texts(model, prompts)]
    check_lengths(model, lengths, [f"detection prompt {i}" for i in range(len(prompts))],
                  rows=batch_size, logits=False, what="prompt", fix="show shorter contexts")  # fmt: skip
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])  # less padding per batch
    scores = torch.empty(len(prompts))
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc="detect", unit="batch", disable=not progress):
        idx = order[s : s + batch_size]
        logits = last_token_logits(model, [prompts[i] for i in idx])
        scores[idx] = yes_no_logodds(logits, yes, no)
    return scores


def detection_metrics(
    scores: Annotated[Tensor, "n"], target: Annotated[Tensor, "n"]
) -> dict[str, Any]:
    """AUROC of scores for target 1 vs 0, and balanced accuracy thresholding at the median score.

    The median threshold (not 0) because a small model leans Yes or No across the board; with as
    many negatives as positives it asks whether the label ranks the halves apart.
    """
    target = target.long()
    n_pos, n = int(target.sum()), len(target)
    if n_pos == 0 or n_pos == n:
        return {"auroc": None, "accuracy": None, "threshold": None, "n": n}
    threshold = float(scores.median())
    pred = (scores > threshold).long()
    balanced = (binary_recall(pred, target) + binary_specificity(pred, target)) / 2
    return {
        "auroc": float(binary_auroc(scores.float(), target)),
        "accuracy": float(balanced),
        "threshold": threshold,
        "n": n,
    }


def derangement(labels: Sequence[str], generator: torch.Generator, tries: int = 1000) -> list[int]:
    """A random permutation with no fixed point, preferring one that also changes every label text."""
    n = len(labels)
    if n < 2:
        raise ValueError(f"a shuffled-label control needs >= 2 features, got {n}")
    fallback = None
    for _ in range(tries):
        perm = torch.randperm(n, generator=generator).tolist()
        if any(perm[i] == i for i in range(n)):
            continue
        if all(labels[perm[i]] != labels[i] for i in range(n)):
            return perm
        fallback = fallback or perm
    if fallback is None:  # not reachable in practice: ~1/e of permutations are derangements
        raise RuntimeError(f"no derangement of {n} found in {tries} tries")
    return fallback  # some label texts repeat across features: only the feature differs


# --- the whole pipeline ---------------------------------------------------------------------------


def label_features(
    model,
    basis,
    acts,
    features: Sequence[int] | None = None,
    n_explain: int = 8,
    n_detect: int = 8,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    window: tuple[int, int] = (12, 3),
    max_new_tokens: int = 16,
    codes: Tensor | None = None,
) -> dict[int, dict]:
    """Label each feature from its top contexts and score the label against a shuffled control.

    Returns {feature: {"label", "raw", "source", "detection": {auroc, accuracy, threshold, n},
    "control": {label, from, auroc, accuracy, threshold, n}, "contrast": {auroc, ...},
    "examples": [marked texts]}}: detection asks with the feature's own label, control with
    another feature's (a derangement), contrast ranks by own-label minus control-label score.
    `codes` (feature_codes(basis, acts)) may be passed when the caller already has them.
    """
    if n_explain < 1 or n_detect < 0:
        raise ValueError(f"need n_explain >= 1 and n_detect >= 0, got {n_explain}, {n_detect}")
    if codes is None:
        codes = feature_codes(basis, acts, progress=progress)
    feats = list(range(codes.shape[1])) if features is None else [int(f) for f in features]
    if len(set(feats)) != len(feats):
        raise ValueError(f"features must be distinct, got {feats}")
    ex = gather_examples(codes, acts, model, feats, n_explain, n_detect, seed, window)
    empty = [f for f in feats if not ex[f].explain]
    if empty:
        raise ValueError(f"features {empty[:5]} have no contexts to label (is the harvest empty?)")

    gen = generate(
        model,
        [label_prompt(model, ex[f].explain) for f in feats],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    raw = dict(zip(feats, gen.completions, strict=True))
    labels = {f: clean_label(raw[f]) for f in feats}
    source = {f: "model" if labels[f] else "marked words" for f in feats}
    labels = {f: labels[f] or fallback_label(ex[f].explain) for f in feats}

    if len(feats) >= 2:
        perm = derangement([labels[f] for f in feats], torch.Generator().manual_seed(int(seed)))
        donor = {f: feats[perm[i]] for i, f in enumerate(feats)}
    else:
        log.warning("one feature only: no other feature's label for the shuffled control")
        donor = {}

    questions: list[str] = []
    slots: dict[tuple[int, str], list[int]] = {}  # (feature, arm) -> indices into questions
    targets = {}
    for f in feats:
        held = ex[f].positives + ex[f].negatives
        targets[f] = torch.tensor([1] * len(ex[f].positives) + [0] * len(ex[f].negatives))
        arms = {"detection": labels[f]} | ({"control": labels[donor[f]]} if f in donor else {})
        for arm, lab in arms.items():
            slots[f, arm] = list(range(len(questions), len(questions) + len(held)))
            questions += [detect_prompt(model, lab, c) for c in held]
    scores = score_questions(model, questions, batch_size, progress)

    out = {}
    for f in feats:
        entry: dict[str, Any] = {
            "label": labels[f],
            "raw": raw[f],
            "source": source[f],
            "detection": None,
            "control": None,
            "contrast": None,
            "examples": [c.text(MARK) for c in ex[f].explain],
        }
        det, ctl = slots.get((f, "detection")), slots.get((f, "control"))
        if det:
            entry["detection"] = detection_metrics(scores[det], targets[f])
        if det and ctl:
            m = detection_metrics(scores[ctl], targets[f])
            entry["control"] = {"label": labels[donor[f]], "from": donor[f], **m}
            # Same contexts under both labels: the difference cancels whatever makes the model
            # say Yes to a context regardless of label; 0.5 when the label adds nothing.
            entry["contrast"] = detection_metrics(scores[det] - scores[ctl], targets[f])
        out[f] = entry
    return out


def detection_summary(labels: dict[int, dict]) -> dict[str, Any]:
    """Mean AUROC of true labels vs shuffled ones, the fraction beating their control, mean contrast."""
    rows = [
        e
        for e in labels.values()
        if e.get("detection")
        and e.get("control")
        and e["detection"]["auroc"] is not None
        and e["control"]["auroc"] is not None
    ]
    if not rows:
        return {
            "n_features": 0,
            "auroc": None,
            "control_auroc": None,
            "beats_control": None,
            "contrast_auroc": None,
        }
    true = [e["detection"]["auroc"] for e in rows]
    ctrl = [e["control"]["auroc"] for e in rows]
    contrast = [
        e["contrast"]["auroc"] for e in rows if (e.get("contrast") or {}).get("auroc") is not None
    ]
    return {
        "n_features": len(rows),
        "auroc": sum(true) / len(rows),
        "control_auroc": sum(ctrl) / len(rows),
        "beats_control": sum(t > c for t, c in zip(true, ctrl, strict=True)) / len(rows),
        "contrast_auroc": sum(contrast) / len(contrast) if contrast else None,
    }


def feature_name(labels: dict[int, dict] | None, i: int) -> str:
    """ "f123 'animals'" when feature 123 has a label, else "f123"."""
    entry = (labels or {}).get(int(i))
    label = entry.get("label") if entry else None
    return f"f{int(i)} {label!r}" if label else f"f{int(i)}"


# --- labels.json ----------------------------------------------------------------------------------


def _sha256(path: Path) -> str | None:
    """sha256 of a file, or None when it is absent."""
    if not path.exists():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_dict(model_info) -> dict[str, Any]:
    """A model's identity as a dict from a ModelInfo, a dict, or a loaded model."""
    if isinstance(model_info, dict):
        info = model_info
    elif hasattr(model_info, "to_dict"):
        info = model_info.to_dict()
    else:
        from analoglock.model import model_info as info_of

        info = info_of(model_info).to_dict()
    if not info.get("sha256"):
        raise ValueError(f"model info needs a 'sha256', got {info}")
    return info


def labels_path(basis_dir: str | Path) -> Path:
    """Where a basis's labels live."""
    return Path(basis_dir) / LABELS_FILE


def write_labels(basis_dir: str | Path, labels: dict[int, dict], model_info) -> Path:
    """Write labels.json beside a saved basis (atomic), with model sha256, hook and basis hash."""
    cfg = read_basis_cfg(basis_dir)
    doc = {
        "version": LABELS_VERSION,
        "model": _model_dict(model_info),
        "hook": cfg.get("hook", ""),
        "basis_sha256": _sha256(Path(basis_dir) / BASIS_FILE),
        "summary": detection_summary(labels),
        "features": {str(int(f)): e for f, e in sorted(labels.items())},
    }
    path = labels_path(basis_dir)
    write_json(path, doc)  # strict JSON: undefined numbers become null
    return path


def read_labels(basis_dir: str | Path, model=None) -> dict[int, dict]:
    """{feature: entry} from labels.json; checks the basis fit and hook, and the model if given.

    `model` may be a loaded model, a ModelInfo, a dict with "sha256" or a sha256 string.
    """
    path = labels_path(basis_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: label the basis first (analoglock.bases.labels.label_features "
            "then write_labels, or analoglock-dashboard label=true)"
        )
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("version") != LABELS_VERSION:
        raise LabelsMismatchError(f"{path}: version {doc.get('version')} is not {LABELS_VERSION}")
    basis_dir = Path(basis_dir)
    if (basis_dir / "cfg.json").exists():
        hook = read_basis_cfg(basis_dir).get("hook", "")
        if hook != doc.get("hook"):
            raise LabelsMismatchError(
                f"{path} labels a basis at hook {doc.get('hook')!r}, but {basis_dir} is at "
                f"{hook!r}; relabel it"
            )
    sha = _sha256(basis_dir / BASIS_FILE)
    if sha is not None and doc.get("basis_sha256") not in (None, sha):
        raise LabelsMismatchError(
            f"{path} was written for another fit of this basis ({BASIS_FILE} changed since); "
            "relabel it"
        )
    if model is not None:
        want = model if isinstance(model, str) else _model_dict(model)["sha256"]
        have = doc.get("model", {}).get("sha256")
        if want != have:
            raise LabelsMismatchError(
                f"{path} was labeled by model sha256 {str(have)[:12]}... "
                f"({doc.get('model', {}).get('spec')}), not {want[:12]}...; relabel with this model "
                "or load the model that made them"
            )
    return {int(f): e for f, e in doc["features"].items()}
