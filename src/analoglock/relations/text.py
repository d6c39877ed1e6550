"""Text helpers for the relations analyses: content words, paraphrase data, token ids.

Owns (1) the content-word rules (function words, a light stemmer) that decide whether two texts
share content; (2) loading a paraphrase pairs file and checking that each paraphrase shares no
content word with the pair it paraphrases; (3) token ids as the model reads a text (BOS first when
the model prepends one), and the control inputs built from them (the same tokens shuffled, or
random tokens of a vocabulary). Knows nothing of activations or of any analysis.
"""

from __future__ import annotations

import re
from typing import Annotated

import torch
from torch import Tensor

from analoglock.data import StoryPair, load_pairs
from analoglock.data.loaders import DatasetFormatError
from analoglock.tokens import prepend_bos_id

DEFAULT_PAIRS = "vacation_deadline"
DEFAULT_PARAPHRASES = "vacation_deadline_paraphrase"
PARAPHRASE_PREFIX = "paraphrase of "
CONTROLS = ("shuffle", "random")

# ---------------------------------------------------------------- content words

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


def default_texts(n: int = 4) -> list[str]:
    """Both sides of the first vacation/deadline pairs."""
    pairs = load_pairs(DEFAULT_PAIRS)
    return [s for p in pairs[: (n + 1) // 2] for s in (p.a, p.b)][:n]


# ---------------------------------------------------------------- token ids


def encode(model, text: str, max_tokens: int | None = None) -> Annotated[Tensor, "pos"]:
    """Token ids of a text as the model reads it (BOS first when the model prepends one),
    truncated to `max_tokens`."""
    if not text or not text.strip():
        raise ValueError("Texts to run must be non-empty")
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = prepend_bos_id(model)
    ids = ([bos] if bos is not None else []) + list(ids)
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def n_prefix(model) -> int:
    """Leading positions that are not text (the BOS), skipped by pooling and controls."""
    return 1 if prepend_bos_id(model) is not None else 0


def single_token(model, s: str) -> int:
    """The id of a string that is exactly one token."""
    ids = model.tokenizer(s, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"Target token {s!r} is {len(ids)} tokens; give strings that are one token each"
        )
    return int(ids[0])


def top_tokens(model, logits: Annotated[Tensor, "n vocab"], k: int) -> list[list[str]]:
    """Decoded top-k tokens of each row of logits."""
    idx = logits.topk(k, dim=-1).indices.cpu()
    return [[model.tokenizer.decode([int(i)]) for i in row] for row in idx]


def equal_length(ids_a: Tensor, ids_b: Tensor) -> tuple[Tensor, Tensor]:
    """Both truncated to the shorter length (BOS kept), so every position holds a real token of
    each input."""
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
