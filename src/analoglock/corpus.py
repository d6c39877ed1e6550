"""A general-text corpus sampled from the frozen instruct model, for learning features offline.

Owns: the story requests (small word lists combined deterministically from a seed), sampling
them batch by batch with per-batch seeds, the resumable JSONL file on disk and its loader.
Knows nothing of hooks or features; decoding is `analoglock.generation.generate`.

A corpus is a sequence of batches. Batch `b` of seed `s` always uses the same requests and the
sampling seed `s * BATCH_SEED_STRIDE + b`, so a file extended in several runs equals one made in a
single run, and a killed run loses at most the batch it was writing. Whole batches are kept, so a
file overshoots `n_tokens` by up to one batch.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from analoglock.atomic import write_json
from analoglock.data.documents import Document
from analoglock.data.loaders import DatasetFormatError
from analoglock.generation import chat_prompt, generate
from analoglock.model import cache_root, model_info

log = logging.getLogger(__name__)

SAMPLERS = ("nucleus", "transformers")  # see generate_corpus
DECODERS = ("hf_modules", "bridge")  # see generate_corpus
BATCH_SEED_STRIDE = 100003  # > batches in any corpus (10^6 tokens is ~300), so seeds never collide
PROMPT_VERSION = 1  # bump when the word lists or templates change: old files then refuse to resume
MAX_EMPTY_BATCHES = 10  # consecutive batches with no text before we call the model broken
LINE_FIELDS: dict[str, type] = {
    "id": str,
    "text": str,
    "prompt": str,
    "n_tokens": int,
    "batch": int,
}

CHARACTERS = (
    "a little rabbit", "a brave girl", "a shy boy", "an old owl", "a friendly dragon",
    "a small robot", "a curious cat", "a clumsy puppy", "a kind grandmother", "a tiny mouse",
    "a busy bee", "a lonely whale", "a happy frog", "a young prince", "a silly monkey",
    "a gentle bear", "a little fox", "a lost duckling", "a wise turtle", "a cheerful farmer",
    "a sleepy lion", "a proud rooster", "a helpful fairy", "a playful dolphin",
    "a girl named Lily", "a boy named Tom", "a girl named Mia", "a boy named Ben",
)  # fmt: skip
EVENTS = (
    "finds a secret door", "loses a favorite toy", "makes a new friend", "learns to share",
    "gets lost", "wants to fly", "plants a seed", "is afraid of the dark", "bakes a cake",
    "helps a friend in trouble", "goes on a picnic", "finds a treasure map",
    "cannot fall asleep", "runs a big race", "builds a tree house",
    "sees snow for the first time", "breaks something by accident", "tries a new food",
    "goes to school for the first time", "finds a hurt bird", "wins a prize",
    "gets a surprise gift", "learns to swim", "has a bad day",
)  # fmt: skip
PLACES = (
    "in a big forest", "at the beach", "on a farm", "in a small town", "in the park",
    "at school", "in a garden", "on a mountain", "by a river", "in the city", "at the zoo",
    "in a castle", "under the sea", "on the moon", "in a busy market", "at grandma's house",
    "in a snowy village", "on a boat", "in the jungle", "in a library", "in a cozy house",
    "at the playground",
)  # fmt: skip
OBJECTS = (
    "a red ball", "a shiny key", "a kite", "a magic hat", "a blue umbrella", "an old map",
    "a jar of honey", "a music box", "a paper boat", "a golden feather", "a teddy bear",
    "a big box", "a bicycle", "a lantern", "a basket of apples", "a toy train",
    "a bright star", "a pair of boots", "a little bell", "a flower pot",
)  # fmt: skip
THEMES = (
    "friendship", "kindness", "sharing", "courage", "honesty", "patience", "helping others",
    "being different", "saying sorry", "trying again", "family", "curiosity", "teamwork",
    "being thankful", "being gentle", "hope", "listening", "telling the truth",
)  # fmt: skip
TEMPLATES = (
    "Write a short story for young children about {character} who {event} {place}. "
    "Use simple words.",
    "Write a short story for young children about {character} who {event} {place}. "
    "The story should include {object}. Use simple words.",
    "Write a short story for young children about {character} who {event} {place}. "
    "The story should teach a lesson about {theme}. Use simple words.",
    "Tell a simple bedtime story about {character} and {object} {place}. "
    "Make it about {theme}. Use simple words.",
    "Write a short, happy story for a three-year-old about {character} who {event}. "
    "Use simple words.",
)


@dataclass(frozen=True)
class CorpusSettings:
    """What fixes a corpus file's content; stored beside it so a resume cannot mix settings."""

    model_sha256: str
    seed: int
    batch_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float = 1.0
    prompt_version: int = PROMPT_VERSION
    # how tokens are drawn (sampling.nucleus_sample since 2026-11-30; files made before were
    # drawn by transformers' warpers: the same distribution, other draws for the same seed)
    sampler: str = "nucleus"
    # what runs the model (the HF modules the bridge wraps since 2026-11-30, 05:00 UTC; files made
    # before ran through the bridge: the same model, other rounding, so other draws at times)
    decoder: str = "hf_modules"


@dataclass(frozen=True)
class _FileState:
    """What a corpus file holds: lines, tokens, the next batch to make, its valid byte length."""

    n_lines: int
    n_tokens: int
    next_batch: int
    valid_bytes: int


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of one batch: its requests and its sampling both derive from it."""
    return seed * BATCH_SEED_STRIDE + batch_index


def story_request(rng: random.Random) -> str:
    """One user request for a children's story, drawn from the word lists."""
    template = rng.choice(TEMPLATES)
    return template.format(
        character=rng.choice(CHARACTERS),
        event=rng.choice(EVENTS),
        place=rng.choice(PLACES),
        object=rng.choice(OBJECTS),
        theme=rng.choice(THEMES),
    )


def batch_requests(seed: int, batch_index: int, batch_size: int) -> list[str]:
    """The `batch_size` user requests of one batch (plain text, before the chat template)."""
    rng = random.Random(batch_seed(seed, batch_index))
    return [story_request(rng) for _ in range(batch_size)]


def default_corpus_path(model, seed: int = 0) -> Path:
    """Where a model's corpus for `seed` is cached unless the caller names a file."""
    return cache_root() / "corpus" / f"{model_info(model).sha256[:12]}-seed{seed}.jsonl"


def settings_path(path: Path) -> Path:
    """The JSON file beside a corpus that records its `CorpusSettings`."""
    return path.with_name(path.stem + ".meta.json")


def _parse_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    """One corpus line as a dict with every field of `LINE_FIELDS`, or a located error."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DatasetFormatError(
            f"{path}:{lineno}: not valid JSON ({err.msg}); a cut-off last line is repaired by "
            "running generate_corpus on the file again"
        ) from err
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}:{lineno}: expected a JSON object")
    for key, typ in LINE_FIELDS.items():
        value = obj.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise DatasetFormatError(
                f"{path}:{lineno}: field {key!r} must be a {typ.__name__}, got {value!r}"
            )
    return obj


def _scan(path: Path) -> _FileState:
    """Read an existing corpus file; a cut-off last line drops its whole batch, to be redone."""
    if not path.exists():
        return _FileState(0, 0, 0, 0)
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # `tail` is b"" when the file ends in a newline
    n_lines = n_tokens = offset = 0
    last_batch, last_batch_start, last_batch_lines, last_batch_tokens = -1, 0, 0, 0
    for lineno, raw in enumerate(complete, 1):
        obj = _parse_line(path, lineno, raw.decode("utf-8"))
        if obj["batch"] != last_batch:
            if obj["batch"] < last_batch:
                raise DatasetFormatError(
                    f"{path}:{lineno}: batch {obj['batch']} follows batch {last_batch}; "
                    "batches must be in order"
                )
            last_batch, last_batch_start = obj["batch"], offset
            last_batch_lines = last_batch_tokens = 0
        n_lines += 1
        n_tokens += obj["n_tokens"]
        last_batch_lines += 1
        last_batch_tokens += obj["n_tokens"]
        offset += len(raw) + 1
    if tail:  # a write was cut off; which batch it belonged to is unknown, so redo the last one
        log.warning(
            "%s ends in a cut-off line (an interrupted write); batch %d is dropped and redone",
            path,
            max(last_batch, 0),
        )
        if last_batch < 0:
            return _FileState(0, 0, 0, 0)
        return _FileState(
            n_lines - last_batch_lines,
            n_tokens - last_batch_tokens,
            last_batch,
            last_batch_start,
        )
    return _FileState(n_lines, n_tokens, last_batch + 1, offset)


def _check_settings(path: Path, settings: CorpusSettings, has_lines: bool) -> None:
    """Refuse to extend a file made with other settings; record them for a new file."""
    meta = settings_path(path)
    wanted = asdict(settings)
    if has_lines and meta.exists():
        stored = json.loads(meta.read_text(encoding="utf-8"))
        stored.setdefault("sampler", "transformers")  # made before the sampler was recorded
        stored.setdefault("decoder", "bridge")  # made before the decoder was recorded
        diff = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}={old!r} (asked {new!r})" for k, (old, new) in diff.items())
            raise ValueError(
                f"{path} was generated with other settings: {detail}. Pass the settings it was "
                "made with to extend it (a file that records no sampler or decoder was made "
                "before they were recorded: sampler=transformers, decoder=bridge), or another "
                "out_path for a new corpus."
            )
        return
    if has_lines:
        log.warning("%s has no %s; assuming it matches the current settings", path, meta.name)
    write_json(meta, wanted)


def sample_batch(
    model,
    seed: int,
    batch_index: int,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    repetition_penalty: float = 1.0,
    on_step: Callable[[], None] | None = None,
    hf_sampling: bool = False,
    hook_points: bool = False,
) -> list[dict[str, Any]]:
    """One batch's non-empty stories as rows `{"text", "prompt", "n_tokens", "batch"}`.

    Decoded with the Hugging Face modules the bridge wraps (`generate(hook_points=False)`:
    nothing is hooked while a corpus is written), or through the bridge with `hook_points`.
    `on_step` is called once per decoding step.
    """
    requests = batch_requests(seed, batch_index, batch_size)
    out = generate(
        model,
        [chat_prompt(model, r) for r in requests],
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=batch_seed(seed, batch_index),
        batch_size=batch_size,
        hf_sampling=hf_sampling,
        hook_points=hook_points,
        on_step=on_step,
    )
    kept = [(r, c.strip()) for r, c in zip(requests, out.completions, strict=True) if c.strip()]
    if not kept:
        return []
    ids = model.tokenizer([text for _, text in kept], add_special_tokens=False)["input_ids"]
    return [
        {"text": text, "prompt": request, "n_tokens": len(row_ids), "batch": batch_index}
        for (request, text), row_ids in zip(kept, ids, strict=True)
    ]


class _StepBar:
    """The corpus progress bar, moved at every decoding step rather than once per batch.

    A batch of 128 stories x 200 steps takes minutes on a CPU, so a per-batch bar sat at 0 for
    that long. Each step adds an estimate (story tokens kept per step, measured on the batches
    finished so far; one per row at first), which gives tqdm a rate and an ETA; a finished batch
    replaces its estimate with its true token count.
    """

    def __init__(self, total: int, have: int, batch_size: int, max_new_tokens: int, enabled: bool):
        self.bar = tqdm(total=total, initial=have, unit="tok", desc="corpus", disable=not enabled)
        self.max_new_tokens = max_new_tokens
        self.per_step = float(batch_size)
        self.steps_seen = self.tokens_seen = 0
        self.batch = self.step = 0
        self.estimated = 0  # this batch's estimated tokens already shown on the bar

    def start(self, batch: int) -> None:
        self.batch, self.step, self.estimated = batch, 0, 0

    def on_step(self) -> None:
        self.step += 1
        room = self.bar.total - self.bar.n
        add = max(0, min(round(self.step * self.per_step) - self.estimated, room))
        self.estimated += add
        self.bar.set_postfix_str(f"batch {self.batch}, step {self.step}/{self.max_new_tokens}", refresh=False)  # fmt: skip
        self.bar.update(add)

    def finish(self, made: int) -> None:
        """Swap this batch's estimate for the `made` tokens it really kept."""
        self.steps_seen += self.step
        self.tokens_seen += made
        if self.steps_seen:
            self.per_step = self.tokens_seen / self.steps_seen
        self.bar.update(made - self.estimated)  # may be negative: tqdm allows it

    def close(self) -> None:
        self.bar.close()


def check_choices(sampler: str, decoder: str) -> None:
    """A clear error unless `sampler` is one of SAMPLERS and `decoder` one of DECODERS (callers
    check before loading a model)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")


def generate_corpus(
    model,
    n_tokens: int,
    seed: int = 0,
    out_path: str | Path | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_p: float = 0.95,
    repetition_penalty: float = 1.1,
    progress: bool = True,
    sampler: str = "nucleus",
    decoder: str = "hf_modules",
) -> Path:
    """Sample short stories into a JSONL file until it holds at least `n_tokens` story tokens.

    `sampler` is how tokens are drawn: "nucleus" (`sampling.nucleus_sample`) or "transformers"
    (its own warpers; what files made before 2026-11-30 used, so they can be extended as made).
    `decoder` is what runs the model: "hf_modules" (`generate(hook_points=False)`: faster, no hook
    point runs) or "bridge" (what files that record no decoder were made with).

    Each line is `{"id", "text", "prompt", "n_tokens", "batch"}`; `n_tokens` counts the story's
    tokens without special tokens. An existing file is extended from its next batch (or returned
    at once when it already holds enough), so the result depends only on the settings and `seed`.
    The file is created by the first finished batch, so a run killed before it leaves no empty
    file; each batch is appended in one write, and a cut-off one is redone by the next run.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}"
        )
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    check_choices(sampler, decoder)
    path = Path(out_path) if out_path is not None else default_corpus_path(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = CorpusSettings(
        model_sha256=model_info(model).sha256,
        seed=seed,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        repetition_penalty=float(repetition_penalty),
        sampler=sampler,
        decoder=decoder,
    )
    state = _scan(path)
    _check_settings(path, settings, has_lines=state.n_lines > 0)
    if path.exists() and path.stat().st_size != state.valid_bytes:
        with open(path, "r+b") as f:  # drop the cut-off batch before appending after it
            f.truncate(state.valid_bytes)
            os.fsync(f.fileno())
    if state.n_tokens >= n_tokens:
        log.info("%s already holds %d tokens (>= %d)", path, state.n_tokens, n_tokens)
        return path
    if state.n_lines:
        log.info("Resuming %s at batch %d (%d tokens)", path, state.next_batch, state.n_tokens)
    else:
        log.info("Generating a %d-token corpus into %s", n_tokens, path)

    have, n_lines, batch, empty_run = state.n_tokens, state.n_lines, state.next_batch, 0
    bar = _StepBar(n_tokens, have, batch_size, max_new_tokens, enabled=progress)
    try:
        while have < n_tokens:
            bar.start(batch)
            rows = sample_batch(
                model,
                seed,
                batch,
                batch_size,
                max_new_tokens,
                temperature,
                top_p,
                repetition_penalty,
                on_step=bar.on_step if progress else None,
                hf_sampling=sampler == "transformers",
                hook_points=decoder == "bridge",
            )
            lines = []
            for row in rows:
                row = {"id": f"corpus/{n_lines}", **row}
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                n_lines += 1
            if lines:  # one write per batch, so a kill never leaves half of a batch's lines
                with open(path, "a", encoding="utf-8") as f:  # opened only now: never an empty file
                    f.write("".join(lines))
                    f.flush()
                    os.fsync(f.fileno())
            empty_run = 0 if lines else empty_run + 1
            if empty_run >= MAX_EMPTY_BATCHES:
                raise RuntimeError(
                    f"{empty_run} batches in a row produced no text (the model ends every "
                    "story at once); check the model and its chat template."
                )
            made = sum(r["n_tokens"] for r in rows)
            have += made
            bar.finish(made)
            batch += 1
    finally:
        bar.close()
    log.info("%s holds %d stories, %d tokens", path, n_lines, have)
    return path


def corpus_stats(path: str | Path) -> tuple[int, int]:
    """(stories, story tokens) held by a corpus file; (0, 0) when it does not exist."""
    state = _scan(Path(path))
    return state.n_lines, state.n_tokens


def load_corpus(path: str | Path) -> list[Document]:
    """The stories of a corpus file as `Document`s, with the request and counts in `meta`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Corpus file {path} does not exist; make it with generate_corpus.")
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            obj = _parse_line(path, lineno, line)
            meta = {"prompt": obj["prompt"], "n_tokens": obj["n_tokens"], "batch": obj["batch"]}
            docs.append(Document(id=obj["id"], text=obj["text"], meta=meta))
    return docs
