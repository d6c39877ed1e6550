"""Steering prompts: openings that stop before the story ends, role mentions found in text and
token positions, role-transfer prefixes and targets, prompt files, length refusals."""

from __future__ import annotations

import pytest

from analoglock.data.loaders import StoryPair, load_pairs
from analoglock.lock.steering import (
    PromptError,
    check_prompt_lengths,
    read_prompts,
    role_spans,
    role_token_positions,
    role_transfer_items,
    story_opening,
    story_prompts,
)
from analoglock.lock.steering.prompts import split_sentences
from analoglock.tokens import ContextLengthError, encode_texts

PAIR = StoryPair(
    id="t/000",
    split="test",
    source="",
    a="A slow tortoise met a proud hare. The hare laughed at the Tortoise. "
    "The tortoise won the race, and the old hare sulked.",
    b="A junior analyst met a star salesperson. The star salesperson mocked the junior analyst. "
    "The junior analyst hit the target, and the star salesperson sulked.",
    roles=(("tortoise", "junior analyst"), ("hare", "star salesperson"), ("old hare", "ex-star")),
)


def test_story_opening_stops_before_the_story_is_over():
    assert (
        story_opening("A fox lost his tail. He was ashamed.")
        == "Once upon a time, a fox lost his tail."
    )
    assert story_opening("Zeus was angry. Very.") == "Once upon a time, Zeus was angry."
    three = "A fox lost his tail. He was ashamed. He lied."
    assert story_opening(three) == "Once upon a time, a fox lost his tail. He was ashamed."
    assert story_opening(three, max_sentences=1) == "Once upon a time, a fox lost his tail."
    assert (
        story_opening("Once upon a time, a cat slept. It woke.") == "Once upon a time, a cat slept."
    )
    one = story_opening("A crow dropped pebbles into a jug until the water rose")
    assert one == "Once upon a time, a crow dropped pebbles into"  # half the words: never the end
    assert split_sentences('He said "Run!" She ran. Done') == ['He said "Run!"', "She ran.", "Done"]


def test_story_prompts_carry_their_own_roles_and_analogue():
    pairs = load_pairs("fable_work", "test")[:3]
    prompts = story_prompts(pairs)
    for i, (p, pair) in enumerate(zip(prompts, pairs, strict=True)):
        assert p.id == pair.id and p.analogue == pair.b and p.index == i
        assert p.roles == tuple(ra for ra, _ in pair.roles)
        assert p.text.startswith("Once upon a time, ")
        assert len(p.text) - len("Once upon a time, ") < len(pair.a)


def test_role_spans_whole_word_case_insensitive_longer_role_wins():
    spans = role_spans(PAIR.a, ["tortoise", "hare", "old hare"])
    text = PAIR.a
    assert [text[a:b] for a, b in spans["tortoise"]] == ["tortoise", "Tortoise", "tortoise"]
    assert [text[a:b] for a, b in spans["hare"]] == ["hare", "hare"]  # not the one in "old hare"
    assert [text[a:b] for a, b in spans["old hare"]] == ["old hare"]
    assert role_spans("a hares' tale", ["hare"]) == {"hare": []}  # whole words only


def test_role_token_positions_point_at_the_role_words(tiny_model):
    text = "Once upon a time, a slow tortoise met a proud hare and an old hare."
    pos = role_token_positions(tiny_model, text, ["tortoise", "hare", "old hare"])
    ids = encode_texts(tiny_model, [text])[0]
    words = "".join(tiny_model.tokenizer.decode([ids[j]]) for j in pos)
    assert words.split() == ["tortoise", "hare", "old", "hare"]
    assert 0 not in pos  # BOS is index 0; role tokens come after it
    assert role_token_positions(tiny_model, "Nothing here.", ["tortoise"]) == ()


def test_role_transfer_items_stop_before_the_second_mention(tiny_model):
    items = role_transfer_items(tiny_model, [PAIR])
    by_role = {it.role_a: it for it in items}
    assert set(by_role) == {"tortoise", "hare"}  # "old hare" is mentioned once
    tort = by_role["tortoise"]
    assert tort.prefix == "A slow tortoise met a proud hare. The hare laughed at the"
    dec = tiny_model.tokenizer.decode
    # Written where the role would be: with its space, capitalised as the mention ("Tortoise") is.
    assert dec([tort.target]) == " Junior"
    hare = by_role["hare"]
    assert hare.prefix == "A slow tortoise met a proud hare. The"
    assert dec([hare.target]) == " star"
    assert tiny_model.tokenizer.encode(" Star", add_special_tokens=False)[0] in tort.candidates
    for it in items:
        assert it.target in it.candidates and len(set(it.candidates)) == len(it.candidates)
        assert it.roles == ("tortoise", "hare", "old hare")
    # Capitalised mentions give capitalised targets and candidates.
    cap = StoryPair("t/001", "test", "", "The Hare ran. Hare slept.", "x y. Star slept.",
                    (("hare", "star"),))  # fmt: skip
    (item,) = role_transfer_items(tiny_model, [cap])
    assert item.prefix == "The Hare ran." and dec([item.target]) == " Star"


def test_role_transfer_items_on_the_shipped_test_split(tiny_model):
    pairs = load_pairs("fable_work", "test")
    items = role_transfer_items(tiny_model, pairs)
    assert len(items) >= 20
    n_roles = len({rb for p in pairs for _, rb in p.roles})
    for it in items[:10]:
        assert 1 < len(it.candidates) <= n_roles  # identical first tokens counted once
        pair = next(p for p in pairs if p.id == it.pair_id)
        assert pair.a.startswith(it.prefix)


def test_read_prompts(tmp_path):
    assert read_prompts(None) is None
    assert read_prompts(["a", " ", "b"]) == ["a", "b"]
    assert read_prompts("Once upon a time") == ["Once upon a time"]
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(str(path)) == ["first prompt", "second prompt"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_prompts(str(tmp_path / "missing.txt"))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(PromptError, match=r"latin1\.txt is not UTF-8"):
        read_prompts(str(latin))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(PromptError, match="no non-empty prompt"):
        read_prompts(str(empty))


def test_long_prompts_are_refused_or_truncated_on_request(tiny_model):
    long = "word " * 600  # the tiny model's context is 512 tokens
    with pytest.raises(ContextLengthError, match=r"longest.*truncate=true|truncate=true"):
        check_prompt_lengths(tiny_model, ["short", long], ["ok", "long one"], max_new_tokens=8)
    with pytest.raises(ContextLengthError, match="long one"):
        check_prompt_lengths(tiny_model, ["short", long], ["ok", "long one"], max_new_tokens=8)
    short, cut = check_prompt_lengths(tiny_model, ["short", long], max_new_tokens=8, truncate=True)
    assert short == "short"
    assert len(encode_texts(tiny_model, [cut])[0]) + 8 <= 512
    assert long.startswith(cut.strip()[:100])
    # A memory budget too small for the batch refuses too, naming the budget.
    with pytest.raises(ContextLengthError, match="budget"):
        check_prompt_lengths(tiny_model, ["short " * 100], max_new_tokens=8, budget_bytes=1000)
