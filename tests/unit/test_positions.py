"""Position rules select the right token indices, tagged with the right spans.

Offsets are written by hand (BOS (0, 0) at index 0, first_real=1) so each rule's edge cases are
explicit; one test runs the real SmolLM2 tokenizer through the harvester's tokenization.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from analoglock.data.documents import Document, Span
from analoglock.positions import (
    AllTokens,
    LastToken,
    MatchString,
    SpanTokens,
    TokenIndices,
    position_rule,
)

TEXT = "The tortoise beat the hare."
# BOS, "The", " tortoise", " beat", " the", " hare", "."  (as the SmolLM2 tokenizer splits it)
OFFSETS = [(0, 0), (0, 3), (3, 12), (12, 17), (17, 21), (21, 26), (26, 27)]
FIRST_REAL = 1


def _doc(*spans: Span, text: str = TEXT) -> Document:
    for sp in spans:
        assert 0 <= sp.start < sp.end <= len(text)
    return Document("toy", text, spans)


TORTOISE = Span("role0", 4, 12)
HARE = Span("role1", 22, 26)


def test_spans_mark_the_intended_words():
    assert TEXT[TORTOISE.start : TORTOISE.end] == "tortoise"
    assert TEXT[HARE.start : HARE.end] == "hare"


# --- AllTokens --------------------------------------------------------------------------------


def test_all_tokens_excludes_bos_and_tags_spans():
    got = AllTokens().select(_doc(TORTOISE, HARE), OFFSETS, FIRST_REAL)
    assert got == [(1, -1), (2, 0), (3, -1), (4, -1), (5, 1), (6, -1)]


def test_all_tokens_include_bos():
    # A span at the very start must not tag BOS, whose offsets (0, 0) are empty.
    got = AllTokens(include_bos=True).select(_doc(Span("det", 0, 3)), OFFSETS, FIRST_REAL)
    assert got == [(0, -1), (1, 0), (2, -1), (3, -1), (4, -1), (5, -1), (6, -1)]


def test_all_tokens_first_span_wins_the_tag():
    got = AllTokens().select(_doc(HARE, Span("np", 18, 26)), OFFSETS, FIRST_REAL)
    assert got[3:5] == [(4, 1), (5, 0)]  # " the" only in span 1; " hare" in both, tagged 0


# --- LastToken --------------------------------------------------------------------------------


def test_last_token():
    assert LastToken().select(_doc(HARE), OFFSETS, FIRST_REAL) == [(6, -1)]
    assert LastToken().select(_doc(HARE, Span("stop", 26, 27)), OFFSETS, FIRST_REAL) == [(6, 1)]
    assert LastToken().select(_doc(), OFFSETS[:3], FIRST_REAL) == [(2, -1)]


# --- TokenIndices -----------------------------------------------------------------------------


def test_token_indices_default_is_last():
    assert TokenIndices().select(_doc(), OFFSETS, FIRST_REAL) == [(6, -1)]


def test_token_indices_negative_out_of_range_and_repeats():
    rule = TokenIndices(indices=[-1, 2, 100, -100, 6, -5, 0, -7])
    # n = 7: -1 -> 6; 2; 100 and -100 skipped; 6 repeat; -5 -> 2 repeat; 0 (BOS); -7 -> 0 repeat
    got = rule.select(_doc(TORTOISE), OFFSETS, FIRST_REAL)
    assert got == [(6, -1), (2, 0), (0, -1)]


def test_token_indices_all_out_of_range_is_empty():
    assert TokenIndices(indices=[7, -8]).select(_doc(), OFFSETS, FIRST_REAL) == []


# --- SpanTokens -------------------------------------------------------------------------------


def test_span_tokens_all_spans():
    got = SpanTokens().select(_doc(TORTOISE, HARE), OFFSETS, FIRST_REAL)
    assert got == [(2, 0), (5, 1)]


def test_span_tokens_labels_filter():
    doc = _doc(TORTOISE, HARE)
    assert SpanTokens(labels=["role1"]).select(doc, OFFSETS, FIRST_REAL) == [(5, 1)]
    assert SpanTokens(labels=["role0"]).select(doc, OFFSETS, FIRST_REAL) == [(2, 0)]
    assert SpanTokens(labels=["concept"]).select(doc, OFFSETS, FIRST_REAL) == []


def test_span_tokens_partial_overlap_counts():
    # "oise be" covers the end of " tortoise" and the start of " beat".
    doc = _doc(Span("x", 8, 15))
    assert SpanTokens().select(doc, OFFSETS, FIRST_REAL) == [(2, 0), (3, 0)]
    # "tort": a few characters inside one token.
    assert SpanTokens().select(_doc(Span("x", 4, 8)), OFFSETS, FIRST_REAL) == [(2, 0)]


def test_span_tokens_touching_boundary_does_not_count():
    # " beat" is exactly token 3 = chars [12, 17); token 2 ends at 12 and token 4 starts at 17.
    assert SpanTokens().select(_doc(Span("x", 12, 17)), OFFSETS, FIRST_REAL) == [(3, 0)]


def test_span_tokens_which_last():
    doc = _doc(Span("x", 8, 15), HARE)
    assert SpanTokens(which="last").select(doc, OFFSETS, FIRST_REAL) == [(3, 0), (5, 1)]
    with pytest.raises(ValueError, match="which"):
        SpanTokens(which="first")


# --- MatchString ------------------------------------------------------------------------------

ANT_TEXT = "The giant ant met an Ant."
# BOS, "The", " gi", "ant", " ant", " met", " an", " Ant", "."  ("giant" split so a token is "ant")
ANT_OFFSETS = [(0, 0), (0, 3), (3, 6), (6, 9), (9, 13), (13, 17), (17, 20), (20, 24), (24, 25)]


def test_match_string_whole_word_case_insensitive():
    doc = _doc(text=ANT_TEXT)
    assert ANT_TEXT[6:9] == "ant"  # the subword of "giant" that must not match
    assert MatchString("ant").select(doc, ANT_OFFSETS, FIRST_REAL) == [(4, -1), (7, -1)]
    assert MatchString("ANT").select(doc, ANT_OFFSETS, FIRST_REAL) == [(4, -1), (7, -1)]
    assert MatchString("an").select(doc, ANT_OFFSETS, FIRST_REAL) == [(6, -1)]
    assert MatchString("giant").select(doc, ANT_OFFSETS, FIRST_REAL) == [(2, -1), (3, -1)]
    assert MatchString("giant", which="last").select(doc, ANT_OFFSETS, FIRST_REAL) == [(3, -1)]
    assert MatchString("elephant").select(doc, ANT_OFFSETS, FIRST_REAL) == []


# --- factory ----------------------------------------------------------------------------------


def test_position_rule_builds_each_kind():
    assert position_rule("all", include_bos=True) == AllTokens(include_bos=True)
    assert isinstance(position_rule("last"), LastToken)
    assert position_rule("indices", indices=[0, -1]).indices == [0, -1]
    assert position_rule("spans", labels=["role0"], which="last") == SpanTokens(["role0"], "last")
    assert position_rule("match", text="hare").text == "hare"


def test_position_rule_errors_list_valid_names():
    with pytest.raises(ValueError) as err:
        position_rule("first")
    msg = str(err.value)
    assert "'first'" in msg
    for name in ("all", "last", "indices", "spans", "match"):
        assert name in msg
    with pytest.raises(TypeError):
        position_rule("last", which="all")  # LastToken takes no options


# --- real tokenizer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from tests.helpers import embedded_tokenizer

    return embedded_tokenizer()


def test_span_tokens_with_real_tokenizer(tokenizer):
    from analoglock.activations import tokenize_documents

    doc = _doc(HARE)
    model = SimpleNamespace(tokenizer=tokenizer, cfg=SimpleNamespace(default_prepend_bos=True))
    (tok,) = tokenize_documents(model, [doc])
    assert tok.first_real == 1
    assert tok.ids[0] == tokenizer.bos_token_id and tok.offsets[0] == (0, 0)
    pieces = [tokenizer.decode([i]) for i in tok.ids]
    got = SpanTokens().select(doc, tok.offsets, tok.first_real)
    assert got, "no token selected for the span"
    assert all(k == 0 for _, k in got)
    selected = [i for i, _ in got]
    assert all("hare" in pieces[i] for i in selected)
    # And nothing else: every non-BOS token containing "hare" is selected, no other token is.
    assert selected == [i for i in range(1, len(pieces)) if "hare" in pieces[i]]
