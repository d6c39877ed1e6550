"""The sentence judge: unit-norm embeddings, office text scored as B, a clear install message."""

from __future__ import annotations

import pytest
import torch

from analoglock.lock.judge import Judge, unit_mean


@pytest.fixture(scope="module")
def judge():
    from analoglock.lock.judge import JudgeNotFoundError, judge_model_dir, load_judge

    try:
        judge_model_dir()
    except JudgeNotFoundError as err:
        pytest.skip(str(err))
    return load_judge()


ANIMALS = [
    "The fox hunted rabbits in the forest.",
    "A wolf howled at the moon beside the old oak tree.",
    "The bear slept in its cave all winter long.",
]
OFFICES = [
    "The manager asked the team to finish the report by Friday.",
    "Employees gathered in the conference room for the budget meeting.",
    "The office printer jammed again just before the deadline.",
]


def test_judge_scores_office_as_b_and_forest_as_a(judge):
    assert isinstance(judge, Judge)
    emb = judge.embed(["hello", "two words"])
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    office = judge.domain_score(
        ["The manager scheduled a meeting about the quarterly report"], ANIMALS, OFFICES
    )
    forest = judge.domain_score(["The fox ran through the forest"], ANIMALS, OFFICES)
    assert office.item() > 0 > forest.item()
    torch.testing.assert_close(judge.centroid(OFFICES), unit_mean(judge.embed(OFFICES)))


def test_judge_ranks_a_story_closest_to_its_own_analogue(judge):
    from analoglock.lock.steering import cosine_ranks

    texts = [
        "The fox crept after the rabbit under the oak.",
        "The printer broke before the deadline.",
    ]
    cands = judge.embed(ANIMALS[:1] + OFFICES[2:])
    assert cosine_ranks(judge.embed(texts), cands, [0, 1]).tolist() == [1.0, 1.0]


def test_unit_mean_refuses_no_references():
    with pytest.raises(ValueError, match="empty"):
        unit_mean(torch.zeros(0, 4))


def test_missing_judge_package_says_how_to_install(monkeypatch):
    import importlib.util

    from analoglock.lock import judge as judge_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == judge_mod.JUDGE_PACKAGE else real(name, *a),
    )
    with pytest.raises(judge_mod.JudgeNotFoundError, match="make install"):
        judge_mod.judge_model_dir()
