"""Feature labels on the tiny model: prompts, Yes/No scoring, the shuffled control, metrics, files."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from analoglock.bases import PCABasis
from analoglock.bases.contexts import Context, feature_codes
from analoglock.bases.labels import (
    LABELS_FILE,
    MARK,
    NO,
    YES,
    LabelsMismatchError,
    clean_label,
    derangement,
    detect_prompt,
    detection_metrics,
    detection_summary,
    fallback_label,
    feature_name,
    gather_examples,
    inactive_threshold,
    label_features,
    label_prompt,
    read_labels,
    score_questions,
    write_labels,
)
from analoglock.model import model_info
from tests.helpers import fit_pca, harvest_shipped

HOOK = "blocks.2.hook_resid_post"
FEATURES = [0, 1, 2]


@pytest.fixture(scope="module")
def acts(tiny_model):
    return harvest_shipped(tiny_model, HOOK, split="train", n=16)


@pytest.fixture(scope="module")
def basis(acts):
    return fit_pca(acts.acts[HOOK], 6, HOOK)


@pytest.fixture(scope="module")
def codes(basis, acts):
    return feature_codes(basis, acts)


@pytest.fixture(scope="module")
def labeled(tiny_model, basis, acts, codes):
    return label_features(
        tiny_model, basis, acts, FEATURES, n_explain=3, n_detect=3, seed=1, progress=False
    )


def test_examples_split_and_negatives(tiny_model, acts, codes):
    ex = gather_examples(codes, acts, tiny_model, FEATURES, n_explain=3, n_detect=3, seed=0)
    for f in FEATURES:
        e = ex[f]
        assert len(e.explain) == 3 and len(e.positives) == 3 and len(e.negatives) == 3
        for c in e.explain + e.positives:  # each is its document's strongest row
            assert codes[c.row, f] == codes[acts.doc == c.doc, f].max()
        # Held out means held out: no row and no text shared with what the labeler saw.
        assert not {c.row for c in e.explain} & {c.row for c in e.positives}
        assert not {c.text(MARK) for c in e.explain} & {c.text(MARK) for c in e.positives}
        thr = inactive_threshold(codes[:, f])
        assert all(codes[c.row, f] <= thr for c in e.negatives)
        for n, p in itertools.product(e.negatives, e.explain + e.positives):
            assert n.doc != p.doc or abs(n.pos - p.pos) > 15  # outside every top window
        assert min(c.value for c in e.positives) > thr
        assert [c.value for c in e.explain] == sorted((c.value for c in e.explain), reverse=True)


def test_prompts_carry_the_marked_tokens(tiny_model, acts, codes):
    ex = gather_examples(codes, acts, tiny_model, FEATURES, n_explain=3, n_detect=2, seed=0)
    tok = tiny_model.tokenizer
    for f in FEATURES:
        prompt = label_prompt(tiny_model, ex[f].explain)
        assert prompt.startswith("<|im_start|>")  # the chat template is applied
        for c in ex[f].explain:
            word = c.tokens[c.highlight]
            assert tok.decode([int(acts.token[c.row])]) == word
            assert f"<<{word}>>" in c.text(MARK)
            assert c.text(MARK).strip() in prompt
        q = detect_prompt(tiny_model, "small animals", ex[f].positives[0])
        assert '"small animals"' in q and ex[f].positives[0].text(MARK).strip() in q


def test_scores_equal_direct_logit_differences(tiny_model):
    prompts = [
        "hello there",
        "a much longer prompt, with several more tokens in it than the first",
        "The tortoise and the hare agreed to run a race.",
        "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n",
        "one",
    ]
    got = score_questions(tiny_model, prompts, batch_size=2)  # mixed lengths within batches
    tok = tiny_model.tokenizer
    yes = [tok.encode(s, add_special_tokens=False)[0] for s in YES]
    no = [tok.encode(s, add_special_tokens=False)[0] for s in NO]
    for p, g in zip(prompts, got, strict=True):
        ids = tok(p, add_special_tokens=False)["input_ids"]
        if ids[0] != tok.bos_token_id:
            ids = [tok.bos_token_id, *ids]
        with torch.no_grad():
            logits = tiny_model(torch.tensor([ids]))[0, -1].double()
        probs = logits.softmax(-1)
        want = torch.log(probs[yes].sum() / probs[no].sum())
        assert abs(float(g) - float(want)) < 1e-4


def test_metrics_on_a_constructed_case():
    pos = [3.0, 2.0, 1.0, 0.5]
    neg = [0.0, 2.5, -1.0, 0.5]  # one tie with a positive: counts half
    scores = torch.tensor(pos + neg)
    target = torch.tensor([1] * 4 + [0] * 4)
    pairs = [1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg)]
    m = detection_metrics(scores, target)
    assert m["auroc"] == pytest.approx(sum(pairs) / len(pairs))  # Mann-Whitney
    thr = sorted(pos + neg)[3]  # the lower median
    tpr = sum(p > thr for p in pos) / 4
    tnr = sum(q <= thr for q in neg) / 4
    assert m["threshold"] == thr and m["n"] == 8
    assert m["accuracy"] == pytest.approx((tpr + tnr) / 2)
    perfect = detection_metrics(torch.tensor([5.0, 4, 1, 0]), torch.tensor([1, 1, 0, 0]))
    assert perfect["auroc"] == 1.0 and perfect["accuracy"] == 1.0
    flipped = detection_metrics(torch.tensor([0.0, 1, 4, 5]), torch.tensor([1, 1, 0, 0]))
    assert flipped["auroc"] == 0.0 and flipped["accuracy"] == 0.0
    assert detection_metrics(torch.tensor([1.0, 2]), torch.tensor([1, 1]))["auroc"] is None


def test_derangement_has_no_fixed_points():
    for n, seed in itertools.product(range(2, 9), range(30)):
        labels = [f"label {i}" for i in range(n)]
        perm = derangement(labels, torch.Generator().manual_seed(seed))
        assert sorted(perm) == list(range(n))
        assert all(perm[i] != i for i in range(n))
    # Repeated texts: prefer a derangement that changes every text when one exists.
    labels = ["a", "a", "b", "b"]
    for seed in range(20):
        perm = derangement(labels, torch.Generator().manual_seed(seed))
        assert all(labels[perm[i]] != labels[i] for i in range(4))
    with pytest.raises(ValueError, match=">= 2 features"):
        derangement(["only"], torch.Generator())


def test_label_features_entries(tiny_model, acts, codes, labeled):
    assert sorted(labeled) == FEATURES
    for f, e in labeled.items():
        assert e["label"] and len(e["label"].split()) <= 5
        if e["source"] == "model":
            assert e["label"] == clean_label(e["raw"])
        else:  # the model's answer cleaned to nothing
            assert clean_label(e["raw"]) == "" and e["source"] == "marked words"
        assert len(e["examples"]) == 3 and all("<<" in t for t in e["examples"])
        ctrl = e["control"]
        assert ctrl["from"] != f and ctrl["label"] == labeled[ctrl["from"]]["label"]
        for arm in (e["detection"], ctrl, e["contrast"]):
            assert 0.0 <= arm["auroc"] <= 1.0 and 0.0 <= arm["accuracy"] <= 1.0
            assert arm["n"] == 6
    # The stored numbers are the metrics of the questions asked: recompute one feature by hand.
    f = FEATURES[1]
    ex = gather_examples(codes, acts, tiny_model, [f], n_explain=3, n_detect=3, seed=1)[f]
    held = ex.positives + ex.negatives
    target = torch.tensor([1] * len(ex.positives) + [0] * len(ex.negatives))
    scores = {}
    for arm, label in (
        ("detection", labeled[f]["label"]),
        ("control", labeled[f]["control"]["label"]),
    ):
        scores[arm] = score_questions(
            tiny_model, [detect_prompt(tiny_model, label, c) for c in held]
        )
        got = detection_metrics(scores[arm], target)["auroc"]
        assert got == pytest.approx(labeled[f][arm]["auroc"])
    contrast = detection_metrics(scores["detection"] - scores["control"], target)
    assert contrast["auroc"] == pytest.approx(labeled[f]["contrast"]["auroc"])


def test_summary_and_feature_name(labeled):
    s = detection_summary(labeled)
    assert s["n_features"] == len(FEATURES)
    aurocs = [e["detection"]["auroc"] for e in labeled.values()]
    assert s["auroc"] == pytest.approx(sum(aurocs) / len(aurocs))
    beats = [e["detection"]["auroc"] > e["control"]["auroc"] for e in labeled.values()]
    assert s["beats_control"] == pytest.approx(sum(beats) / len(beats))
    contrast = [e["contrast"]["auroc"] for e in labeled.values()]
    assert s["contrast_auroc"] == pytest.approx(sum(contrast) / len(contrast))
    assert feature_name({123: {"label": "animals"}}, 123) == "f123 'animals'"
    assert feature_name({}, 7) == "f7" and feature_name(None, 7) == "f7"


def test_clean_label():
    assert clean_label(" 1. Small, thin, tiny, large\n\n") == "Small, thin, tiny, large"
    assert clean_label(' "Laughed, Tears"') == "Laughed, Tears"
    assert clean_label("Label: animals.") == "animals"
    assert clean_label(" 1.\n\nsenior people") == "senior people"
    assert clean_label("one two three four five six seven") == "one two three four five"
    assert len(clean_label("x" * 200)) <= 48
    assert clean_label(' "The Marked Words"\n\nsmall animals') == "small animals"
    assert clean_label("Marked words: Client, Managers") == "Client, Managers"
    assert clean_label("  \n ...") == ""


def test_fallback_label_lists_commonest_marked_words():
    def ctx(word):
        return Context(doc=0, pos=1, value=1.0, tokens=["The", f" {word}", " ran"], highlight=1)

    words = ["fox", "hare", "hare", "dog", "fox", "hare", "cat"]
    assert fallback_label([ctx(w) for w in words]) == "hare, fox, dog"


def test_labels_file_round_trip_and_mismatch(tmp_path, tiny_model, basis, acts, labeled):
    d = basis.save(tmp_path / "basis", model=model_info(tiny_model).to_dict())
    path = write_labels(d, labeled, model_info(tiny_model))
    assert path.name == LABELS_FILE
    doc = json.loads(path.read_text())
    assert doc["hook"] == HOOK and doc["model"]["sha256"] == model_info(tiny_model).sha256
    assert doc["summary"] == detection_summary(labeled)
    assert read_labels(d) == labeled
    assert read_labels(d, model=tiny_model) == labeled
    with pytest.raises(LabelsMismatchError, match="labeled by model sha256"):
        read_labels(d, model="0" * 64)
    # A refit basis in the same directory makes the labels stale.
    PCABasis(6, hook=HOOK).fit(acts.acts[HOOK][::2]).save(d)
    with pytest.raises(LabelsMismatchError, match="another fit"):
        read_labels(d)
    with pytest.raises(FileNotFoundError, match="label the basis first"):
        read_labels(tmp_path)
