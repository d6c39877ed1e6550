"""Interpolation between unrelated inputs: commonalities, tangents, and which commonalities are abstract.

Owns the interpolation paths (linear and spherical, per position) between two inputs in the
token-embedding space and in the residual stream at chosen hooks, and between two relation
vectors added to an input; what is read along each path (a basis's features at a later residual
hook, z-scored against a reference corpus, and the logit lens at the last position); the
commonality / tangent definitions and their control paths (shuffled-token and random-token
inputs of the same lengths, random relation vectors of the same norms); and the paraphrase data
(`pairs/vacation_deadline_paraphrase.jsonl`, whose `source` names the original pair) with the
content-word check that makes a surviving commonality "abstract". Knows nothing of how concept
vectors are built (part A's modules) or of the CLI beyond `run(cfg, ctx)`.

Definitions (all per feature f of the basis, by default an SVD fit on the reference texts, split
into its positive and negative halves when the codes are signed, pooled as the mean over the
non-BOS positions):
- z_f(x) = (a_f(x) - mu_f) / sigma_f, with mu/sigma over the reference texts;
- commonality: z_f >= theta at both ends of a path;
- tangent: max over interior steps of z_f >= theta, both ends < theta, and the interior peak
  exceeds the larger end by at least `margin`;
- abstract commonality: a commonality of (A, B) that is also a commonality of (A', B'), their
  paraphrases with no content word in common with A or B; superficial otherwise. The control is
  the same test against the paraphrases of a different pair.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import plotly.graph_objects as go
import torch
from torch import Tensor
from tqdm.auto import tqdm

from analoglock.activations import harvest
from analoglock.data import Document, StoryPair, available_datasets, load_documents, load_pairs
from analoglock.data.loaders import DatasetFormatError
from analoglock.hooks import stop_layer, validate_hook
from analoglock.positions import AllTokens
from analoglock.tokens import prepend_bos_id

log = logging.getLogger(__name__)

MODES = ("linear", "slerp")
CONTROLS = ("shuffle", "random")
BASIS_FITS = ("reference", "inputs")  # what the default SVD basis is fit on
DEFAULT_PAIRS = "vacation_deadline"
DEFAULT_PARAPHRASES = "vacation_deadline_paraphrase"
DEFAULT_REFERENCE = "fable_work"  # Aesop fables: a domain unrelated to vacations and deadlines
PARAPHRASE_PREFIX = "paraphrase of "
LENGTH_RULE = (
    "both inputs truncated to the shorter one's token count (BOS kept), so every position holds a "
    "real token of each input and the endpoints are the truncated inputs themselves"
)


class IncompatibleHookError(ValueError):
    """A hook where interpolating or reading a path is not meaningful."""


# ---------------------------------------------------------------- paraphrases and content words

_FUNCTION_WORDS = """
a an the and or but nor so yet if then than as at by for from in into of off on onto out over to up
down with without within about above across after against along among around before behind below
beneath beside besides between beyond during except inside near past since through throughout till
toward towards under until upon via while whilst where when whenever which who whom whose what why
how that this these those there here it its itself i me my mine myself we us our ours ourselves you
your yours yourself he him his himself she her hers herself they them their theirs themselves be am
is are was were been being have has had having do does did doing done will would shall should can
could may might must not no only just also very too even all any both each every few more most other
another some such own same again once ever never always already now soon much many one ones
anything everything something nothing anyone everyone someone nobody anybody everybody somebody else
away instead
"""
STOPWORDS = frozenset(_FUNCTION_WORDS.split())
_WORD_RE = re.compile(r"[a-z]+")
# (suffix, replacement, minimum word length); the first match is stripped
_SUFFIXES = (
    ("ies", "y", 5),
    ("ied", "y", 5),
    ("ing", "", 6),
    ("ed", "", 5),
    ("es", "", 5),
    ("ly", "", 5),
    ("s", "", 4),
)


def stem(word: str) -> str:
    """A light suffix-stripping stem (packed/packing/pack -> pack, planned/plan -> plan)."""
    w = word
    for suffix, rep, least in _SUFFIXES:
        if w.endswith(suffix) and len(w) >= least and not (suffix == "s" and w.endswith("ss")):
            w = w[: len(w) - len(suffix)] + rep
            break
    if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "aeiouls":
        w = w[:-1]  # planned -> plann -> plan
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]  # hope/hoped -> hop
    return w


def content_words(text: str) -> set[str]:
    """Stems of the words of 3+ letters that are not function words."""
    return {stem(w) for w in _WORD_RE.findall(text.lower()) if len(w) >= 3 and w not in STOPWORDS}


def shared_content_words(text_1: str, text_2: str) -> set[str]:
    """Content-word stems two texts have in common."""
    return content_words(text_1) & content_words(text_2)


def load_paraphrases(name: str = DEFAULT_PARAPHRASES) -> list[tuple[StoryPair, StoryPair]]:
    """(original pair, paraphrased pair) for a paraphrase pairs file, validated.

    A paraphrase file is an ordinary pairs file (FORMAT.md) whose every `source` reads
    "paraphrase of <dataset>/<NNN>"; the paraphrased pair may share no content word with the
    original pair (either story), so a commonality that survives cannot come from shared words.
    """
    paras = load_pairs(name)
    originals: dict[str, dict[str, StoryPair]] = {}
    out = []
    for para in paras:
        if not para.source.startswith(PARAPHRASE_PREFIX):
            raise DatasetFormatError(
                f"{name}: {para.id} has source {para.source!r}; a paraphrase file needs "
                f"'{PARAPHRASE_PREFIX}<dataset>/<NNN>' on every line"
            )
        ref = para.source[len(PARAPHRASE_PREFIX) :].strip()
        dataset = ref.rsplit("/", 1)[0]
        if dataset not in originals:
            originals[dataset] = {p.id: p for p in load_pairs(dataset)}
        if ref not in originals[dataset]:
            raise DatasetFormatError(f"{name}: {para.id} paraphrases {ref!r}, which does not exist")
        orig = originals[dataset][ref]
        shared = (content_words(para.a) | content_words(para.b)) & (
            content_words(orig.a) | content_words(orig.b)
        )
        if shared:
            raise DatasetFormatError(
                f"{name}: {para.id} shares content words with {ref}: {', '.join(sorted(shared))}; "
                "a paraphrase may share only function words with the original pair"
            )
        out.append((orig, para))
    return out


# ---------------------------------------------------------------- interpolation math


def step_grid(n_steps: int) -> Annotated[Tensor, "n_steps"]:
    """t = 0, 1/(n-1), ..., 1 (float64 so the endpoints are exact)."""
    if int(n_steps) < 2:
        raise ValueError(f"n_steps must be >= 2 (the two endpoints), got {n_steps}")
    return torch.linspace(0.0, 1.0, int(n_steps), dtype=torch.float64)


def lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """(1 - t) a + t b for every t: [n_steps, *a.shape]; exact at t = 0 and 1."""
    t = t.to(a.dtype).reshape(-1, *([1] * a.ndim))
    return (1 - t) * a + t * b


def slerp(a: Tensor, b: Tensor, t: Tensor, eps: float = 1e-7) -> Tensor:
    """Spherical interpolation along the last dim: the direction moves on the great circle from
    a to b, the norm moves linearly from |a| to |b|; [n_steps, *a.shape], exact at t = 0 and 1.

    Where a and b are (anti)parallel the great circle is undefined and the direction is lerped.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
    ua, ub = a64 / na.clamp_min(eps), b64 / nb.clamp_min(eps)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    tt = t.double().reshape(-1, *([1] * a.ndim))
    ok = sin.abs() > eps
    safe = torch.where(ok, sin, torch.ones_like(sin))
    u_sph = (torch.sin((1 - tt) * theta) * ua + torch.sin(tt * theta) * ub) / safe
    u_lin = (1 - tt) * ua + tt * ub
    u_lin = u_lin / u_lin.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = torch.where(ok, u_sph, u_lin)
    out = (((1 - tt) * na + tt * nb) * u).to(a.dtype)
    out[t == 0] = a  # bit-exact endpoints, so a path's ends reproduce the plain runs
    out[t == 1] = b
    return out


def interpolate(a: Tensor, b: Tensor, t: Tensor, mode: str) -> Tensor:
    """lerp or slerp by name."""
    if mode not in MODES:
        raise ValueError(f"Unknown interpolation mode {mode!r}; valid: {', '.join(MODES)}")
    return lerp(a, b, t) if mode == "linear" else slerp(a, b, t)


# ---------------------------------------------------------------- hooks and tokens

_RESID_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|in|out)$")


def residual_depth(model, hook: str) -> int:
    """Position of a residual-stream hook along the stream (embed = resid_pre 0 = 0,
    resid_post l = resid_pre l+1 = l+1); raises for hooks that are not a complete residual state."""
    validate_hook(model, hook)
    if hook in ("hook_embed", "embed.hook_out"):
        return 0
    m = _RESID_RE.match(hook)
    if m is None:
        raise IncompatibleHookError(
            f"Hook {hook!r} is not a complete residual-stream state: replacing it would not carry "
            "input B's whole state forward (so t=1 would not reproduce B), and the logit lens does "
            "not apply to it. Use hook_embed, blocks.<l>.hook_resid_pre or blocks.<l>.hook_resid_post."
        )
    layer = int(m.group(1))
    return layer if m.group(2) in ("resid_pre", "in") else layer + 1


def check_read_after(model, hooks: Sequence[str], read_hook: str) -> None:
    """The read hook must lie strictly downstream of every interpolation hook."""
    read_depth = residual_depth(model, read_hook)
    for hook in hooks:
        if residual_depth(model, hook) >= read_depth:
            raise IncompatibleHookError(
                f"read_hook {read_hook!r} is not after the interpolation hook {hook!r}: features "
                "read there would be the interpolation itself, not the model's response to it. "
                f"Choose a later residual hook (e.g. blocks.{model.cfg.n_layers - 1}.hook_resid_post)."
            )


def default_hooks(model) -> tuple[list[str], str]:
    """Interpolation hooks (embedding, 1/4 and 1/2 depth) and the read hook (3/4 depth)."""
    n = model.cfg.n_layers
    hooks = ["hook_embed", f"blocks.{n // 4}.hook_resid_post", f"blocks.{n // 2}.hook_resid_post"]
    return hooks, f"blocks.{max((3 * n) // 4, n // 2 + 1)}.hook_resid_post"


def encode(model, text: str) -> Annotated[Tensor, "pos"]:
    """Token ids of a text as the model reads it (BOS first when the model prepends one)."""
    if not text or not text.strip():
        raise ValueError("Interpolation inputs must be non-empty texts")
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = prepend_bos_id(model)
    return torch.tensor(([bos] if bos is not None else []) + list(ids), dtype=torch.long)


def n_prefix(model) -> int:
    """Leading positions that are not text (the BOS), skipped by pooling and controls."""
    return 1 if prepend_bos_id(model) is not None else 0


def equal_length(ids_a: Tensor, ids_b: Tensor) -> tuple[Tensor, Tensor]:
    """Truncate both to the shorter length (see LENGTH_RULE)."""
    n = min(len(ids_a), len(ids_b))
    return ids_a[:n], ids_b[:n]


def shuffled_ids(ids: Tensor, skip: int, gen: torch.Generator) -> Tensor:
    """The same tokens in a random order (prefix kept): same length and bag of tokens."""
    out = ids.clone()
    perm = torch.randperm(len(ids) - skip, generator=gen)
    out[skip:] = ids[skip:][perm]
    return out


def random_ids(ids: Tensor, skip: int, pool: Tensor, gen: torch.Generator) -> Tensor:
    """Random tokens from `pool` (prefix kept): same length, unrelated content."""
    out = ids.clone()
    out[skip:] = pool[torch.randint(len(pool), (len(ids) - skip,), generator=gen)]
    return out


def control_inputs(
    kind: str, ids_a: Tensor, ids_b: Tensor, skip: int, pool: Tensor, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Two unrelated inputs of the same lengths as (ids_a, ids_b) for a control path."""
    if kind == "shuffle":
        return shuffled_ids(ids_a, skip, gen), shuffled_ids(ids_b, skip, gen)
    if kind == "random":
        return random_ids(ids_a, skip, pool, gen), random_ids(ids_b, skip, pool, gen)
    raise ValueError(f"Unknown control {kind!r}; valid: {', '.join(CONTROLS)}")


# ---------------------------------------------------------------- running the model


@torch.no_grad()
def cache_at(model, ids: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
    """Activations [pos, d] of one input at each hook (the run stops after the deepest one)."""
    stop = stop_layer(hooks, model.cfg.n_layers)
    _, cache = model.run_with_cache(
        ids[None].to(model.cfg.device), names_filter=lambda n: n in hooks, stop_at_layer=stop
    )
    return {h: cache[h][0].detach().float().cpu() for h in hooks}


@torch.no_grad()
def run_with_edit(model, ids: Tensor, hook: str, edit, read_hook: str, n: int) -> Tensor:
    """Run `n` copies of `ids`, editing the activation at `hook` with `edit(x) -> x'` ([n, pos, d]);
    returns the read-hook activations [n, pos, d] (the run stops after the read hook)."""
    captured: dict[str, Tensor] = {}

    def edit_hook(x: Tensor, hook=None) -> Tensor:
        new = edit(x)
        if new.shape != x.shape:
            raise IncompatibleHookError(
                f"Hook {hook.name if hook else '?'} carries activations of shape {tuple(x.shape)}, "
                f"but the edit produced {tuple(new.shape)}; interpolate activations of that shape."
            )
        return new.to(x.dtype)

    def read(x: Tensor, hook=None) -> None:
        captured["read"] = x.detach().float().cpu()

    batch = ids[None].expand(n, -1).to(model.cfg.device)
    stop = stop_layer([read_hook], model.cfg.n_layers)
    with model.hooks(fwd_hooks=[(hook, edit_hook), (read_hook, read)]):
        model(batch, stop_at_layer=stop, return_type=None)
    return captured["read"]


def lens_top_tokens(model, resid: Annotated[Tensor, "n d_model"], k: int) -> list[list[str]]:
    """Logit-lens top-k tokens (final norm + unembed) of residual vectors."""
    with torch.no_grad():
        dev = model.cfg.device
        logits = model.unembed(model.ln_final(resid[:, None].to(dev)))[:, 0]
    return top_tokens(model, logits, k)


def top_tokens(model, logits: Annotated[Tensor, "n vocab"], k: int) -> list[list[str]]:
    """Decoded top-k tokens of each row of logits."""
    idx = logits.topk(k, dim=-1).indices.cpu()
    return [[model.tokenizer.decode([int(i)]) for i in row] for row in idx]


# ---------------------------------------------------------------- features


class FeatureReader:
    """Pooled, z-scored feature activity at one hook in one basis.

    Signed bases (SVD, PCA) are split into positive and negative halves ("f3+", "f3-"), so a
    feature active at both ends of a path is active with the same sign. Activity is the mean
    over non-prefix positions of each half's rectified code; z-scores are against `reference`.
    """

    def __init__(self, basis, hook: str, skip: int, signed: bool):
        self.basis, self.hook, self.skip, self.signed = basis, hook, skip, signed
        k = basis.n_features
        self.names = (
            [f"f{i}{s}" for i in range(k) for s in "+-"] if signed else [f"f{i}" for i in range(k)]
        )
        self.mu: Tensor | None = None
        self.sigma: Tensor | None = None

    def activity(self, acts: Annotated[Tensor, "n pos d_model"]) -> Annotated[Tensor, "n f"]:
        """Mean rectified code per half-feature over the non-prefix positions."""
        with torch.no_grad():
            codes = self.basis.encode(acts[:, self.skip :].float())  # [n, pos, k]
        if self.signed:
            halves = torch.stack([codes.clamp_min(0), (-codes).clamp_min(0)], dim=-1)
            return halves.flatten(-2).mean(1)
        return codes.clamp_min(0).mean(1)

    def calibrate(self, activity: Annotated[Tensor, "n_ref f"]) -> FeatureReader:
        """Set mu/sigma from reference activity (sigma floored so silent features stay finite)."""
        if len(activity) < 2:
            raise ValueError("The reference needs at least 2 texts to z-score features")
        self.mu = activity.mean(0)
        sd = activity.std(0)
        self.sigma = sd + 0.05 * sd.median().clamp_min(1e-8)  # a never-active half gets a floor
        return self

    def z(self, activity: Annotated[Tensor, "n f"]) -> Annotated[Tensor, "n f"]:
        """z-scores against the reference."""
        if self.mu is None:
            raise RuntimeError(
                "FeatureReader is not calibrated; call calibrate(reference activity)"
            )
        return (activity - self.mu) / self.sigma


def doc_activity(model, reader: FeatureReader, texts: Sequence[str]) -> Annotated[Tensor, "n f"]:
    """Pooled activity of whole texts (harvested at the reader's hook, every non-BOS token)."""
    docs = [Document(f"interp/{i}", t) for i, t in enumerate(texts)]
    acts = harvest(model, docs, [reader.hook], AllTokens(), progress=False)
    x = acts.acts[reader.hook].float()
    with torch.no_grad():
        codes = reader.basis.encode(x)
    if reader.signed:
        codes = torch.stack([codes.clamp_min(0), (-codes).clamp_min(0)], -1).flatten(-2)
    else:
        codes = codes.clamp_min(0)
    n = len(texts)
    total = torch.zeros(n, codes.shape[-1]).index_add_(0, acts.doc, codes)
    count = torch.bincount(acts.doc, minlength=n).clamp_min(1)[:, None]
    return total / count


def fit_default_basis(model, texts: Sequence[str], hook: str, n_features: int):
    """An SVDBasis fit on every non-BOS token of `texts` at `hook`."""
    from analoglock.bases import SVDBasis

    docs = [Document(f"interp/fit{i}", t) for i, t in enumerate(texts)]
    x = harvest(model, docs, [hook], AllTokens(), progress=False).acts[hook].float()
    k = min(int(n_features), *x.shape)
    return SVDBasis(n_components=k, hook=hook).fit(x)


def commonalities(z0: Tensor, z1: Tensor, theta: float) -> list[int]:
    """Features with z >= theta at both ends."""
    return torch.nonzero((z0 >= theta) & (z1 >= theta)).flatten().tolist()


def tangents(z: Annotated[Tensor, "n_steps f"], theta: float, margin: float) -> list[int]:
    """Features peaking in the interior (>= theta, >= margin above both ends) but weak at both ends."""
    if len(z) < 3:
        return []
    ends = torch.maximum(z[0], z[-1])
    peak = z[1:-1].max(0).values
    hit = (peak >= theta) & (z[0] < theta) & (z[-1] < theta) & (peak - ends >= margin)
    return torch.nonzero(hit).flatten().tolist()


# ---------------------------------------------------------------- paths


def _path_record(
    model, reader, read: Tensor, theta: float, margin: float, top_k: int
) -> dict[str, Any]:
    """Commonalities, tangents, z matrix and top tokens of one path's read activations."""
    z = reader.z(reader.activity(read))
    com, tan = commonalities(z[0], z[-1], theta), tangents(z, theta, margin)
    return {
        "commonalities": [reader.names[i] for i in com],
        "tangents": [reader.names[i] for i in tan],
        "n_commonalities": len(com),
        "n_tangents": len(tan),
        "z": z.tolist(),
        "lens_top_tokens": lens_top_tokens(model, read[:, -1], top_k),
    }


def input_path(
    model,
    reader: FeatureReader,
    ids_a: Tensor,
    ids_b: Tensor,
    hook: str,
    mode: str,
    t: Tensor,
    theta: float,
    margin: float,
    top_k: int = 5,
) -> dict[str, Any]:
    """Interpolate between two equal-length inputs' activations at `hook` and read the path."""
    if ids_a.shape != ids_b.shape:
        raise ValueError(
            f"Inputs must have equal token counts, got {len(ids_a)} and {len(ids_b)}; "
            "use equal_length() first"
        )
    xa, xb = (
        cache_at(model, ids_a, [hook, reader.hook]),
        cache_at(model, ids_b, [hook, reader.hook]),
    )
    path = interpolate(xa[hook], xb[hook], t, mode)
    read = run_with_edit(model, ids_a, hook, lambda x: path.to(x.device), reader.hook, len(t))
    rec = _path_record(model, reader, read, theta, margin, top_k)
    # t=0 / t=1 must reproduce the plain runs of A / B at the read hook (exactly, up to batching)
    rec["endpoint_max_abs_diff"] = [
        float((read[0] - xa[reader.hook]).abs().max()),
        float((read[-1] - xb[reader.hook]).abs().max()),
    ]
    return rec


def relation_path(
    model,
    reader: FeatureReader,
    ids: Tensor,
    hook: str,
    r_a: Tensor,
    r_b: Tensor,
    mode: str,
    t: Tensor,
    theta: float,
    margin: float,
    top_k: int = 5,
) -> dict[str, Any]:
    """Add the interpolation between two relation vectors at every text position of `ids`."""
    d = model.cfg.d_model
    if r_a.shape != (d,) or r_b.shape != (d,):
        raise ValueError(
            f"Relation vectors must be [d_model={d}], got {tuple(r_a.shape)} and {tuple(r_b.shape)}"
        )
    vs = interpolate(r_a.float(), r_b.float(), t, mode)  # [n_steps, d]
    skip = n_prefix(model)

    def add(x: Tensor) -> Tensor:
        out = x.clone()
        out[:, skip:] += vs[:, None].to(x.device, x.dtype)
        return out

    read = run_with_edit(model, ids, hook, add, reader.hook, len(t))
    return _path_record(model, reader, read, theta, margin, top_k)


def _control_stats(main: int, counts: list[int]) -> dict[str, Any]:
    """A count beside its control counts: mean, max, and the fraction of controls >= it."""
    return {
        "main": main,
        "control_counts": counts,
        "control_mean": sum(counts) / len(counts) if counts else None,
        "control_max": max(counts) if counts else None,
        "p_control_ge": (1 + sum(c >= main for c in counts)) / (1 + len(counts)),
    }


def _drop_z(rec: dict[str, Any]) -> dict[str, Any]:
    """A control path's record without its bulky per-step matrices."""
    return {k: v for k, v in rec.items() if k not in ("z", "lens_top_tokens")}


# ---------------------------------------------------------------- abstract vs superficial


def classify_commonalities(
    model,
    reader: FeatureReader,
    pairs: Sequence[tuple[StoryPair, StoryPair]],
    theta: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Abstract vs superficial commonalities over (original, paraphrase) pairs, with the
    mismatched-paraphrase control (pair i tested against pair j's paraphrases, j != i)."""
    if len(pairs) < 2:
        raise ValueError(
            "Classifying commonalities needs at least 2 paraphrased pairs (1 for the control)"
        )
    texts = [s for orig, para in pairs for s in (orig.a, orig.b, para.a, para.b)]
    z = reader.z(doc_activity(model, reader, texts)).reshape(len(pairs), 4, -1)
    n = len(pairs)
    gen = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(1, n, (1,), generator=gen))  # a derangement: i -> i + shift mod n
    rows, per_feature = [], {name: [0, 0, 0] for name in reader.names}
    tot = {"n_commonalities": 0, "n_abstract": 0, "n_superficial": 0, "n_abstract_control": 0}
    for i, (orig, para) in enumerate(pairs):
        com = set(commonalities(z[i, 0], z[i, 1], theta))
        kept = set(commonalities(z[i, 2], z[i, 3], theta))
        j = (i + shift) % n
        kept_ctrl = set(commonalities(z[j, 2], z[j, 3], theta))
        abstract, superficial, abstract_ctrl = com & kept, com - kept, com & kept_ctrl
        for f in abstract:
            per_feature[reader.names[f]][0] += 1
        for f in superficial:
            per_feature[reader.names[f]][1] += 1
        for f in abstract_ctrl:
            per_feature[reader.names[f]][2] += 1
        tot["n_commonalities"] += len(com)
        tot["n_abstract"] += len(abstract)
        tot["n_superficial"] += len(superficial)
        tot["n_abstract_control"] += len(abstract_ctrl)
        rows.append(
            {
                "pair": orig.id,
                "paraphrase": para.id,
                "control_paraphrase": pairs[j][1].id,
                "abstract": sorted(reader.names[f] for f in abstract),
                "superficial": sorted(reader.names[f] for f in superficial),
                "abstract_under_control": sorted(reader.names[f] for f in abstract_ctrl),
                "paraphrase_commonalities": len(kept),
            }
        )
    c = tot["n_commonalities"]
    return {
        "theta": theta,
        "n_pairs": n,
        **tot,
        "abstract_rate": tot["n_abstract"] / c if c else None,
        "abstract_rate_control": tot["n_abstract_control"] / c if c else None,
        "control": "each pair's commonalities tested against the paraphrases of a different pair",
        "per_pair": rows,
        "per_feature": {
            k: {"abstract": v[0], "superficial": v[1], "abstract_under_control": v[2]}
            for k, v in per_feature.items()
            if any(v)
        },
    }


# ---------------------------------------------------------------- the analysis


def _reference_texts(name: str, n: int) -> list[str]:
    """`n` texts of a shipped dataset (pairs: side a) to z-score features against."""
    is_pairs = name in available_datasets()["pairs"]
    docs = load_documents(name, side="a") if is_pairs else load_documents(name)
    texts = [d.text for d in docs][: int(n)]
    if len(texts) < 2:
        raise ValueError(f"Reference {name!r} gave {len(texts)} texts; need at least 2")
    return texts


def analyze_interpolation(
    model,
    hooks: Sequence[str] | str | None = None,
    text_a: str | None = None,
    text_b: str | None = None,
    *,
    read_hook: str | None = None,
    basis=None,
    n_features: int = 16,
    basis_fit: str = "reference",
    n_steps: int = 11,
    modes: Sequence[str] = MODES,
    controls: Sequence[str] = CONTROLS,
    n_controls: int = 3,
    theta: float = 2.0,
    margin: float = 1.0,
    reference: str | Sequence[str] = DEFAULT_REFERENCE,
    n_reference: int = 24,
    paraphrases: str | None = DEFAULT_PARAPHRASES,
    relation_a: Tensor | None = None,
    relation_b: Tensor | None = None,
    relation_hook: str | None = None,
    relation_names: tuple[str, str] = ("relation_a", "relation_b"),
    top_k: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Interpolate between two inputs (default: the first vacation/deadline pair) at each hook
    (hook_embed = token-embedding space) and between two relation vectors; report commonalities
    and tangents beside control paths, and which commonalities survive paraphrasing.

    `basis` is any FeatureBasis fit at `read_hook`; without one, an SVDBasis of `n_features` is fit
    at `read_hook` on `basis_fit`: "reference" (default: the reference texts, which neither the
    main nor the control inputs are) or "inputs" (the two inputs; their features then favour the
    main path over its controls). `reference` is a shipped dataset name or a list of texts.
    """
    t = step_grid(n_steps)
    for m in modes:
        interpolate(torch.zeros(1), torch.zeros(1), t[:1], m)  # validates the name
    bad = [c for c in controls if c not in CONTROLS]
    if bad:
        raise ValueError(f"Unknown controls {bad}; valid: {', '.join(CONTROLS)}")
    if (relation_a is None) != (relation_b is None):
        raise ValueError("Give both relation_a and relation_b (or neither)")
    d_hooks, d_read = default_hooks(model)
    hooks = [hooks] if isinstance(hooks, str) else list(hooks or d_hooks)
    read_hook = read_hook or d_read
    rel_hook = relation_hook or (hooks[-1] if hooks[-1] != "hook_embed" else d_hooks[1])
    check_read_after(model, hooks + ([rel_hook] if relation_a is not None else []), read_hook)
    if text_a is None or text_b is None:
        if text_a is not None or text_b is not None:
            raise ValueError("Give both text_a and text_b (or neither for the default pair)")
        pair = load_pairs(DEFAULT_PAIRS)[0]
        text_a, text_b, source = pair.a, pair.b, pair.id
    else:
        source = "user"
    if basis is not None and getattr(basis, "hook", "") and basis.hook != read_hook:
        raise IncompatibleHookError(
            f"The basis was fit at {basis.hook!r}, but features are read at {read_hook!r}; "
            f"pass read_hook={basis.hook!r} or a basis fit there."
        )
    if basis_fit not in BASIS_FITS:
        raise ValueError(f"Unknown basis_fit {basis_fit!r}; valid: {', '.join(BASIS_FITS)}")
    skip = n_prefix(model)
    ref_texts = (
        _reference_texts(reference, n_reference) if isinstance(reference, str) else list(reference)
    )
    basis_source = "given"
    if basis is None:
        fit_texts = ref_texts if basis_fit == "reference" else [text_a, text_b]
        basis = fit_default_basis(model, fit_texts, read_hook, n_features)
        basis_source = f"every non-BOS token of the {basis_fit} texts at read_hook"
    probe = torch.randn(64, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    signed = bool((basis.encode(probe) < 0).any())  # signed codes get split into +/- halves
    reader = FeatureReader(basis, read_hook, skip, signed)
    reader.calibrate(doc_activity(model, reader, ref_texts))

    full_a, full_b = encode(model, text_a), encode(model, text_b)
    ids_a, ids_b = equal_length(full_a, full_b)
    pool = torch.tensor(
        sorted({int(i) for txt in ref_texts for i in encode(model, txt)[skip:]}), dtype=torch.long
    )
    gen = torch.Generator().manual_seed(int(seed))
    control_ids = {
        kind: [control_inputs(kind, ids_a, ids_b, skip, pool, gen) for _ in range(int(n_controls))]
        for kind in controls
    }
    jobs = [(h, m) for h in hooks for m in modes]
    paths, summary = [], []
    bar = tqdm(jobs, desc="interpolation paths", disable=not progress)
    for hook, mode in bar:
        main = input_path(model, reader, ids_a, ids_b, hook, mode, t, theta, margin, top_k)
        main.update(
            space="embed" if residual_depth(model, hook) == 0 else "resid",
            hook=hook,
            mode=mode,
            kind="main",
        )
        paths.append(main)
        ctrl_counts: dict[str, dict[str, list[int]]] = {}
        for kind, inputs in control_ids.items():
            counts = ctrl_counts.setdefault(kind, {"commonalities": [], "tangents": []})
            for k, (ca, cb) in enumerate(inputs):
                rec = input_path(model, reader, ca, cb, hook, mode, t, theta, margin, top_k)
                rec.update(hook=hook, mode=mode, kind=kind, control_index=k)
                paths.append(_drop_z(rec))
                counts["commonalities"].append(rec["n_commonalities"])
                counts["tangents"].append(rec["n_tangents"])
        summary.append(
            {
                "hook": hook,
                "mode": mode,
                "commonalities": {
                    k: _control_stats(main["n_commonalities"], v["commonalities"])
                    for k, v in ctrl_counts.items()
                },
                "tangents": {
                    k: _control_stats(main["n_tangents"], v["tangents"])
                    for k, v in ctrl_counts.items()
                },
            }
        )
    result: dict[str, Any] = {
        "inputs": {
            "source": source,
            "a": text_a,
            "b": text_b,
            "tokens_a": len(full_a),
            "tokens_b": len(full_b),
            "tokens_used": len(ids_a),
            "length_rule": LENGTH_RULE,
        },
        "hooks": hooks,
        "read_hook": read_hook,
        "basis": {
            "kind": basis.kind,
            "n_features": basis.n_features,
            "signed_halves": signed,
            "fit_on": basis_source,
        },
        "features": reader.names,
        "steps": t.tolist(),
        "theta": theta,
        "margin": margin,
        "reference": {
            "source": reference if isinstance(reference, str) else "user",
            "n_texts": len(ref_texts),
        },
        "controls": {
            "kinds": list(controls),
            "n_per_kind": int(n_controls),
            "shuffle": "each input's tokens permuted (BOS kept)",
            "random": "tokens drawn uniformly from the reference texts' vocabulary",
        },
        "paths": paths,
        "summary": summary,
    }
    if relation_a is not None:
        result["relation"] = _relation_analysis(
            model,
            reader,
            full_a,
            rel_hook,
            relation_a,
            relation_b,
            relation_names,
            modes,
            t,
            theta,
            margin,
            top_k,
            int(n_controls),
            gen,
        )
    if paraphrases:
        result["abstract"] = classify_commonalities(
            model, reader, load_paraphrases(paraphrases), theta, seed
        )
    return result


def _relation_analysis(
    model, reader, ids, hook, r_a, r_b, names, modes, t, theta, margin, top_k, n_controls, gen
) -> dict[str, Any]:
    """Relation-vector paths on one input, beside paths between random vectors of equal norms."""
    r_a, r_b = torch.as_tensor(r_a).float().cpu(), torch.as_tensor(r_b).float().cpu()
    out: dict[str, Any] = {
        "hook": hook,
        "names": list(names),
        "norms": [float(r_a.norm()), float(r_b.norm())],
        "cosine": float(torch.nn.functional.cosine_similarity(r_a, r_b, dim=0)),
        "applied": "added at every text position of input a (BOS untouched)",
        "paths": [],
        "summary": [],
    }
    controls = []
    for _ in range(n_controls):
        ga, gb = torch.randn(r_a.shape, generator=gen), torch.randn(r_b.shape, generator=gen)
        controls.append((ga * r_a.norm() / ga.norm(), gb * r_b.norm() / gb.norm()))
    for mode in modes:
        main = relation_path(model, reader, ids, hook, r_a, r_b, mode, t, theta, margin, top_k)
        main.update(mode=mode, kind="main")
        out["paths"].append(main)
        com, tan = [], []
        for k, (ca, cb) in enumerate(controls):
            rec = relation_path(model, reader, ids, hook, ca, cb, mode, t, theta, margin, top_k)
            rec.update(mode=mode, kind="random_vectors", control_index=k)
            out["paths"].append(_drop_z(rec))
            com.append(rec["n_commonalities"])
            tan.append(rec["n_tangents"])
        out["summary"].append(
            {
                "mode": mode,
                "commonalities": {"random_vectors": _control_stats(main["n_commonalities"], com)},
                "tangents": {"random_vectors": _control_stats(main["n_tangents"], tan)},
            }
        )
    return out


# ---------------------------------------------------------------- report


def _main_paths(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The main (non-control) input paths."""
    return [p for p in result.get("paths", []) if p.get("kind") == "main"]


def figures(result: Mapping[str, Any]) -> dict[str, go.Figure]:
    """Interpolation curves of the commonality/tangent features, counts vs controls, abstract split."""
    figs: dict[str, go.Figure] = {}
    names = result["features"]
    steps = result["steps"]
    for p in _main_paths(result):
        shown = list(dict.fromkeys(p["commonalities"] + p["tangents"]))[:12]
        if not shown:  # nothing flagged: show the features with the largest excursion
            z = torch.tensor(p["z"])
            shown = [names[i] for i in z.abs().max(0).values.topk(min(6, z.shape[1])).indices]
        fig = go.Figure()
        for name in shown:
            j = names.index(name)
            tag = (
                "common"
                if name in p["commonalities"]
                else "tangent"
                if name in p["tangents"]
                else ""
            )
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=[row[j] for row in p["z"]],
                    mode="lines+markers",
                    name=f"{name} {tag}",
                )
            )
        fig.add_hline(y=result["theta"], line_dash="dash", annotation_text="theta")
        fig.update_layout(
            title=f"{p['hook']} ({p['mode']}): feature z along the path; A at t=0, B at t=1",
            xaxis_title="t",
            yaxis_title=f"z at {result['read_hook']}",
        )
        figs[f"interpolate/{p['hook']}/{p['mode']}"] = fig
    labels, main_c, main_t, ctrl = [], [], [], {}
    for row in result.get("summary", []):
        labels.append(f"{row['hook']} {row['mode']}")
        first = next(iter(row["commonalities"].values()), None)
        main_c.append(first["main"] if first else 0)
        main_t.append(next(iter(row["tangents"].values()))["main"] if first else 0)
        for kind, st in row["commonalities"].items():
            ctrl.setdefault(f"{kind} commonalities (mean)", []).append(st["control_mean"])
        for kind, st in row["tangents"].items():
            ctrl.setdefault(f"{kind} tangents (mean)", []).append(st["control_mean"])
    if labels:
        fig = go.Figure(
            [
                go.Bar(name="commonalities", x=labels, y=main_c),
                go.Bar(name="tangents", x=labels, y=main_t),
            ]
        )
        for name, ys in ctrl.items():
            fig.add_trace(go.Bar(name=name, x=labels, y=ys, opacity=0.5))
        fig.update_layout(
            barmode="group", title="Commonalities and tangents: main path vs control paths"
        )
        figs["interpolate/counts"] = fig
    rel = result.get("relation")
    if rel:
        fig = go.Figure()
        for p in rel["paths"]:
            if p.get("kind") != "main":
                continue
            for name in list(dict.fromkeys(p["commonalities"] + p["tangents"]))[:8]:
                j = names.index(name)
                fig.add_trace(
                    go.Scatter(
                        x=steps,
                        y=[row[j] for row in p["z"]],
                        mode="lines+markers",
                        name=f"{p['mode']} {name}",
                    )
                )
        fig.add_hline(y=result["theta"], line_dash="dash", annotation_text="theta")
        fig.update_layout(
            title=f"Relation path {rel['names'][0]} -> {rel['names'][1]} at {rel['hook']}",
            xaxis_title="t",
            yaxis_title="z",
        )
        figs["interpolate/relation"] = fig
    ab = result.get("abstract")
    if ab:
        fig = go.Figure(
            [
                go.Bar(
                    x=[
                        "abstract (own paraphrase)",
                        "superficial",
                        "survive a different pair's paraphrase (control)",
                    ],
                    y=[ab["n_abstract"], ab["n_superficial"], ab["n_abstract_control"]],
                )
            ]
        )
        fig.update_layout(
            title=f"Commonalities over {ab['n_pairs']} pairs: abstract vs superficial"
        )
        figs["interpolate/abstract"] = fig
    return figs


# ---------------------------------------------------------------- CLI adapter


def _section(cfg: Any) -> dict[str, Any]:
    """A plain dict from a Hydra/OmegaConf section, a mapping, or None."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return dict(cfg)


def relation_from_context(ctx, spec: str, hook: str) -> Tensor:
    """A relation vector 'set:classA-classB' (class-mean difference at `hook`) from part A's context."""
    try:
        name, classes = spec.split(":", 1)
        cls_a, cls_b = classes.split("-", 1)
    except ValueError as err:
        raise ValueError(f"Relation spec {spec!r} must look like 'gender:male-female'") from err
    means = ctx.concept(name).means(hook)
    for c in (cls_a, cls_b):
        if c not in means:
            raise ValueError(f"{name} has no class {c!r}; classes: {', '.join(means)}")
    return means[cls_a] - means[cls_b]


def _default_relations(ctx, hook: str) -> tuple[str, str] | None:
    """The first two harvested sets' class0-class1 relations, when there are two such sets."""
    specs = [
        f"{n}:{c.classes[0]}-{c.classes[1]}"
        for n, c in ctx.concepts.items()
        if len(c.classes) >= 2 and hook in c.hooks
    ]
    return (specs[0], specs[1]) if len(specs) >= 2 else None


def run(cfg: Any, ctx) -> dict[str, Any]:
    """`analoglock-relations analyses=[interpolate]`: analyze_interpolation from a config section.

    Keys (all optional): hooks, read_hook, text_a, text_b, n_features, basis_fit, n_steps, modes,
    controls, n_controls, theta, margin, reference, n_reference, paraphrases, relations
    ([spec_a, spec_b] like "gender:male-female"), relation_hook, top_k. ctx.basis is used when it
    was fit at read_hook.
    """
    c = _section(cfg)
    model = ctx.model
    read_hook = c.get("read_hook") or default_hooks(model)[1]
    basis = (
        ctx.basis
        if ctx.basis is not None and getattr(ctx.basis, "hook", None) == read_hook
        else None
    )
    rel_hook = c.get("relation_hook") or next(
        (
            h
            for h in ctx.hooks
            if _RESID_RE.match(h) and residual_depth(model, h) < residual_depth(model, read_hook)
        ),
        None,
    )
    specs = c.get("relations")
    if specs is None and rel_hook is not None and ctx.concepts:
        specs = _default_relations(ctx, rel_hook)
    rel: dict[str, Any] = {}
    if specs:
        if len(specs) != 2 or rel_hook is None:
            raise ValueError(
                "relations needs two specs ('set:a-b') and a residual relation_hook before read_hook"
            )
        rel = {
            "relation_a": relation_from_context(ctx, specs[0], rel_hook),
            "relation_b": relation_from_context(ctx, specs[1], rel_hook),
            "relation_hook": rel_hook,
            "relation_names": (specs[0], specs[1]),
        }
    keys = (
        "basis_fit",
        "hooks",
        "text_a",
        "text_b",
        "n_features",
        "n_steps",
        "modes",
        "controls",
        "n_controls",
        "theta",
        "margin",
        "reference",
        "n_reference",
        "paraphrases",
        "top_k",
    )
    kwargs = {k: c[k] for k in keys if k in c and c[k] is not None}
    if "paraphrases" in c and not c["paraphrases"]:
        kwargs["paraphrases"] = None
    return analyze_interpolation(
        model, read_hook=read_hook, basis=basis, seed=ctx.seed, **kwargs, **rel
    )
