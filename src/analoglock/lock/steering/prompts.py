"""What steering is run on: story openings, role-transfer prefixes, neutral prompts, user prompts.

Owns turning a split of story pairs into prompts (a fable's opening, ending before the story is
over, with its own pair's roles and workplace analogue), finding role mentions in prompt text and
mapping them to token positions (whole word, case-insensitive, through the tokenizer's offsets),
the teacher-forced role-transfer items (a fable prefix that stops just before an aligned role's
second mention, and the candidate workplace roles' first tokens), the neutral prompts, reading a
user's prompt file, and refusing prompts too long for the model. Knows nothing of hooks or
measures.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from analoglock.data.loaders import StoryPair, find_word
from analoglock.generation import chat_prompt
from analoglock.tokens import (
    ContextLengthError,
    check_lengths,
    encode_texts,
    max_tokens,
    prepend_bos_id,
)

log = logging.getLogger(__name__)

# Everyday sentences that are neither fables nor workplace stories: steering should leave them be.
NEUTRAL_PROMPTS = (
    "The recipe calls for two cups of flour and a pinch of salt.",
    "It rained all morning, so the streets were still wet at noon.",
    "She bought a new pair of running shoes on Saturday.",
    "The train to the coast leaves at half past nine.",
    "Water boils at a lower temperature high in the mountains.",
    "He painted the kitchen walls a pale shade of yellow.",
    "The library is closed on public holidays.",
    "My grandmother grows tomatoes and basil in her garden.",
    "The concert was so loud that my ears rang afterwards.",
    "Remember to charge your phone before the long drive.",
)

# What a user would type to get the retelling without any steering: the "asked" reference arm.
# One per shipped pair dataset ({prompt} is the story opening); other datasets give their own.
ASK = {
    "fable_work": "Retell this fable as a short story set in an office. Keep the same plot and "
    "give each animal a workplace role that fits it. Fable: {prompt}",
    "fable_sports": "Retell this fable as a short story about a sports team. Keep the same plot "
    "and give each animal a role on the team that fits it. Fable: {prompt}",
    "vacation_deadline": "Retell this vacation story as a story about a work deadline. Keep the "
    "same plot and give each person a role at work that fits them. Story: {prompt}",
}

STORY_PREFIX = "Once upon a time, "
# First words that read naturally in lower case after the prefix; anything else may be a name.
_LOWERABLE = {"a", "an", "the", "for", "one", "all", "every", "in", "on", "at", "when", "while"}
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


class PromptError(ValueError):
    """Prompts that cannot be read, found, or fit the model."""


# ---------------------------------------------------------------- openings


def split_sentences(text: str) -> list[str]:
    """Sentences of a story (split after . ! ? and any closing quote), stripped, non-empty."""
    out, start = [], 0
    text = text.strip()
    for m in _SENTENCE_END.finditer(text):
        out.append(text[start : m.end()].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def story_opening(text: str, max_sentences: int = 2) -> str:
    """The opening of a story: its first `max_sentences` sentences, always ending before the story
    does (a two-sentence story gives one; a one-sentence story its first half of words), prefixed
    "Once upon a time, " unless it already begins so, so it reads as the start of a told story."""
    sentences = split_sentences(text)
    if len(sentences) >= 2:
        first = " ".join(sentences[: max(1, min(max_sentences, len(sentences) - 1))])
    else:
        words = text.split()
        first = " ".join(words[: max(1, len(words) // 2)])
    if first.lower().startswith("once upon a time"):
        return first
    word = first.split(" ", 1)[0]
    if word.lower() in _LOWERABLE:
        first = first[0].lower() + first[1:]
    return STORY_PREFIX + first


@dataclass(frozen=True)
class StoryPrompt:
    """A prompt to steer: its text, the role words to find in it (domain A side), and when it comes
    from a pair, that pair's id and workplace story (`analogue`) and its index among the split's
    workplace stories (`index`), against which the continuation is ranked."""

    id: str
    text: str
    roles: tuple[str, ...] = ()
    analogue: str | None = None
    index: int | None = None


def story_prompts(pairs: Sequence[StoryPair], max_sentences: int = 2) -> list[StoryPrompt]:
    """One opening per pair (the fable's first sentences), with its own roles and analogue."""
    return [
        StoryPrompt(
            p.id,
            story_opening(p.a, max_sentences),
            tuple(ra for ra, _ in p.roles),
            p.b,
            i,
        )
        for i, p in enumerate(pairs)
    ]


def user_prompts(texts: Sequence[str], roles: Sequence[str] = ()) -> list[StoryPrompt]:
    """Prompts a user gave: no pair, so no analogue; `roles` are looked for in every prompt."""
    return [StoryPrompt(f"prompt/{i:03d}", t, tuple(roles)) for i, t in enumerate(texts)]


# ---------------------------------------------------------------- role positions


def role_spans(text: str, roles: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
    """Character spans of each role's whole-word, case-insensitive mentions in `text`.

    A mention inside a longer role's mention ("fox" in "old fox") belongs to the longer role only.
    """
    found = {r: find_word(text, r) for r in dict.fromkeys(roles)}
    longer = sorted(found, key=len, reverse=True)
    taken: list[tuple[int, int]] = []
    out: dict[str, list[tuple[int, int]]] = {}
    for role in longer:
        keep = [s for s in found[role] if not any(s[0] >= a and s[1] <= b for a, b in taken)]
        out[role] = keep
        taken.extend(keep)
    return {r: out[r] for r in found}


def role_token_positions(model, text: str, roles: Sequence[str]) -> tuple[int, ...]:
    """Indices, in the ids the model reads (BOS included), of tokens overlapping a role mention.

    Offsets come from the tokenizer; a token overlaps a mention when their character ranges
    share a non-space character. A role mentioned in the text that covers no token is an error.
    """
    spans = [s for ss in role_spans(text, roles).values() for s in ss]
    if not spans:
        return ()
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    shift = 1 if prepend_bos_id(model) is not None else 0
    out = set()
    for start, end in spans:
        hit = [
            j + shift
            for j, (a, b) in enumerate(enc["offset_mapping"])
            if max(a, start) < min(b, end) and text[max(a, start) : min(b, end)].strip()
        ]
        if not hit:
            raise PromptError(
                f"role mention {text[start:end]!r} at characters {start}-{end} of {text[:60]!r} "
                "covers no token (the tokenizer gives no offsets for it)."
            )
        out.update(hit)
    return tuple(sorted(out))


# ---------------------------------------------------------------- role transfer


@dataclass(frozen=True)
class RoleItem:
    """One teacher-forced role-transfer probe: the fable `prefix` stops just before `role_a`'s
    second mention; `target` is the first token of the paired `role_b` written there, ranked
    among `candidates` (the first tokens of every workplace role of the split, deduplicated)."""

    pair_id: str
    prefix: str
    role_a: str
    role_b: str
    roles: tuple[str, ...]  # the pair's domain-A roles (steered under positions="roles")
    target: int
    candidates: tuple[int, ...]


def _first_token(model, word: str, space: bool, capital: bool) -> int:
    """First token id of `word` as it would follow the prefix (leading space, capitalised)."""
    word = word[0].upper() + word[1:] if capital else word
    ids = model.tokenizer((" " if space else "") + word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PromptError(f"role {word!r} tokenizes to nothing; fix the pair file's roles.")
    return int(ids[0])


def role_transfer_items(model, pairs: Sequence[StoryPair]) -> list[RoleItem]:
    """Every aligned role mentioned at least twice in its fable gives one item (its second mention).

    The prefix ends before the mention with its trailing space removed, so the first token of
    the answer carries the space, as the tokenizer writes words inside a sentence. The target and
    the candidates are written the way the mention is (capitalised at a sentence start).
    """
    b_roles = list(dict.fromkeys(rb for p in pairs for _, rb in p.roles))
    items = []
    for pair in pairs:
        a_roles = tuple(ra for ra, _ in pair.roles)
        spans = role_spans(pair.a, a_roles)
        for role_a, role_b in pair.roles:
            if len(spans[role_a]) < 2:
                continue
            start, _ = spans[role_a][1]
            prefix = pair.a[:start]
            stripped = prefix.rstrip()
            if not stripped:
                continue
            space = stripped != prefix
            capital = pair.a[start].isupper()
            target = _first_token(model, role_b, space, capital)
            cands = {_first_token(model, rb, space, capital) for rb in b_roles}
            items.append(
                RoleItem(pair.id, stripped, role_a, role_b, a_roles, target, tuple(sorted(cands)))
            )
    return items


# ---------------------------------------------------------------- files and lengths


def read_prompts(spec: Any) -> list[str] | None:
    """Prompts from a config value: None (use the dataset), a list, a .txt path, or one prompt.

    A file must be UTF-8 text with one prompt per line; anything else is an error naming it.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if path.suffix == ".txt" or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(
                    f"prompts={spec!r}: no such file. Give a .txt file with one prompt per line, "
                    "a list (prompts='[\"Once upon a time...\"]'), or null for the dataset."
                )
            try:
                prompts = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as err:
                raise PromptError(
                    f"prompts file {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                    "save it as UTF-8 with one prompt per line."
                ) from err
        else:
            prompts = [spec]  # a single prompt given inline
    else:
        try:
            prompts = [str(p) for p in spec]
        except TypeError as err:
            raise PromptError(f"prompts={spec!r}: give a list, a .txt path or null") from err
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise PromptError(f"prompts={spec!r} holds no non-empty prompt.")
    return prompts


def resolve_ask(ask: str | None, dataset: str | None, model) -> str | None:
    """The instruction of the "asked" reference arm, or None when there is none to run.

    "auto": the shipped instruction of `dataset` (`ASK`) when the model has a chat template (a
    base model is not asked: it was never taught to follow instructions); None: no asked arm;
    any other string is the instruction itself and must contain `{prompt}`.
    """
    if ask is None:
        return None
    if ask != "auto":
        return ask
    if dataset not in ASK:
        log.info("no shipped instruction for %r: the asked reference arm is left out", dataset)
        return None
    if not getattr(model.tokenizer, "chat_template", None):
        log.warning("the model has no chat template: the asked reference arm is left out")
        return None
    return ASK[dataset]


def asked_prompts(model, prompts: Sequence[StoryPrompt], instruction: str) -> list[StoryPrompt]:
    """Each prompt inside `instruction` (its `{prompt}`), in the model's chat template."""
    return [replace(p, text=chat_prompt(model, instruction.format(prompt=p.text))) for p in prompts]


def check_prompt_lengths(
    model,
    texts: Sequence[str],
    names: Sequence[str] | None = None,
    max_new_tokens: int = 0,
    batch_size: int = 16,
    truncate: bool = False,
    budget_bytes: int | None = None,
) -> list[str]:
    """`texts`, refused (or with `truncate`, cut from the end) when a prompt plus `max_new_tokens`
    does not fit the model's context or the memory of a batch of `batch_size` of them.

    Uses the shared `analoglock.tokens.check_lengths`, before anything is generated.
    """
    names = [f"prompt {i}" for i in range(len(texts))] if names is None else list(names)

    def check(rows: Sequence[str]) -> None:
        check_lengths(
            model,
            [len(ids) for ids in encode_texts(model, rows)],
            names,
            extra=max_new_tokens,
            rows=batch_size,
            budget_bytes=budget_bytes,
            what="prompt",
            fix="set truncate=true to keep the start of each prompt",
        )

    try:
        check(texts)
        return list(texts)
    except ContextLengthError:
        if not truncate:
            raise
    lengths = [len(ids) for ids in encode_texts(model, texts)]
    limit = max_tokens(model, max_new_tokens, budget_bytes=budget_bytes, rows=batch_size)
    if limit < 2:
        raise PromptError(
            f"no prompt fits: max_new_tokens={max_new_tokens} leaves {limit} tokens of context; "
            "lower max_new_tokens or batch_size."
        )
    tok = model.tokenizer
    shift = 1 if prepend_bos_id(model) is not None else 0
    out = []
    for text, n in zip(texts, lengths, strict=True):
        if n <= limit:
            out.append(text)
            continue
        ids = tok(text, add_special_tokens=False)["input_ids"][: limit - shift]
        out.append(tok.decode(ids))
        log.warning("prompt truncated from %d to %d tokens", n, limit)
    check(out)  # decoding and re-encoding may merge tokens differently; make sure it still fits
    return out


__all__ = [
    "ASK",
    "asked_prompts",
    "resolve_ask",
    "NEUTRAL_PROMPTS",
    "STORY_PREFIX",
    "PromptError",
    "RoleItem",
    "StoryPrompt",
    "check_prompt_lengths",
    "read_prompts",
    "role_spans",
    "role_token_positions",
    "role_transfer_items",
    "split_sentences",
    "story_opening",
    "story_prompts",
    "user_prompts",
]
