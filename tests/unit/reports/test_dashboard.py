"""Feature contexts, the logit lens and the dashboard page (rendered in headless Chromium)."""

from __future__ import annotations

import json

import pytest
import torch

from analoglock.activations import harvest_to_disk, tokenize_documents
from analoglock.bases import PCABasis, SVDBasis
from analoglock.bases.contexts import (
    feature_codes,
    feature_frequency,
    random_contexts,
    top_contexts,
    top_rows,
)
from analoglock.data import load_documents
from analoglock.model import model_info
from analoglock.reports.dashboard import (
    IncompatibleBasisError,
    activation_histogram,
    check_compatible,
    feature_order,
    label_scores,
    lens_extremes,
    load_labels,
    write_dashboard,
)
from analoglock.unembed import final_norm_gain, unembedding
from tests import browser
from tests.helpers import compose_cli, fit_pca, harvest_shipped

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def acts(tiny_model):
    return harvest_shipped(tiny_model, HOOK, split="test", n=12)


@pytest.fixture(scope="module")
def pca(acts):
    return fit_pca(acts.acts[HOOK], 16, HOOK)


@pytest.fixture(scope="module")
def codes(pca, acts):
    return feature_codes(pca, acts)


# --- codes and frequency ------------------------------------------------------------------------


def test_batched_codes_equal_one_encode(pca, acts, codes):
    assert torch.allclose(feature_codes(pca, acts, batch_rows=7), codes, atol=1e-5)
    assert torch.allclose(codes, pca.encode(acts.acts[HOOK]), atol=1e-5)
    with pytest.raises(KeyError, match="not in this harvest"):
        feature_codes(pca, acts, hook="blocks.0.hook_resid_post")


def test_frequency_and_order():
    codes = torch.zeros(10, 4)
    codes[:3, 0] = 1.0  # 0.3
    codes[:7, 1] = 0.5  # 0.7
    codes[:3, 2] = 2.0  # 0.3, larger power than feature 0
    codes[0, 3] = -1.0  # 0.1 (sign does not matter)
    assert feature_frequency(codes).tolist() == pytest.approx([0.3, 0.7, 0.3, 0.1])
    assert feature_order(codes) == [1, 2, 0, 3]
    dense = torch.randn(50, 3) * torch.tensor([1.0, 3.0, 2.0])  # active everywhere: by power
    assert feature_order(dense) == [1, 2, 0]


def test_histogram_counts_nonzero_only():
    v = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, -1.0])
    centres, counts = activation_histogram(v, bins=4)
    assert sum(counts) == 4 and len(centres) == 4 and min(centres) > -1 and max(centres) < 3


# --- contexts -----------------------------------------------------------------------------------


def test_harvested_token_is_the_retokenized_one(tiny_model, acts, pca, codes):
    toks = tokenize_documents(tiny_model, acts.docs)
    for r in range(len(acts)):
        assert toks[int(acts.doc[r])].ids[int(acts.pos[r])] == int(acts.token[r])
    tok = tiny_model.tokenizer
    for f, ctxs in top_contexts(codes, acts, tiny_model, k=5).items():
        for c in ctxs:
            assert "".join(c.tokens) in acts.docs[c.doc].text  # pieces join to the document text
            assert c.tokens[c.highlight] == tok.decode([int(acts.token[c.row])])
            assert (int(acts.doc[c.row]), int(acts.pos[c.row])) == (c.doc, c.pos)
            assert c.value == pytest.approx(float(codes[c.row, f]))


def _first_per_doc(order: list[int], doc) -> list[int]:
    """Brute force: walking rows in order, keep the first row of each document."""
    best, seen = [], set()
    for r in order:
        if int(doc[r]) not in seen:
            seen.add(int(doc[r]))
            best.append(r)
    return best


def test_top_contexts_are_the_brute_force_argmax(acts, codes, tiny_model):
    k = 6
    free = top_contexts(codes, acts, tiny_model, k=k, one_per_doc=False)
    per_doc = top_contexts(codes, acts, tiny_model, k=k)
    low = top_contexts(codes, acts, tiny_model, k=k, features=[3], descending=False)
    # Documents opening with the same tokens give tied codes, so rows are compared by value.
    for f in range(codes.shape[1]):
        col = codes[:, f]
        order = torch.argsort(col, descending=True, stable=True).tolist()
        assert [c.value for c in free[f]] == col[order[:k]].tolist()
        assert [c.value for c in free[f]] == [float(col[c.row]) for c in free[f]]
        assert [c.value for c in per_doc[f]] == col[_first_per_doc(order, acts.doc)[:k]].tolist()
        assert len({c.doc for c in per_doc[f]}) == len(per_doc[f]) == k
    ascending = torch.argsort(codes[:, 3], stable=True).tolist()
    assert [c.value for c in low[3]] == codes[_first_per_doc(ascending, acts.doc)[:k], 3].tolist()


def test_exclude_and_window(acts, codes, tiny_model):
    best = int(codes[:, 0].argmax())
    ctx = top_contexts(codes, acts, tiny_model, k=3, features=[0], exclude=[best])[0]
    assert best not in [c.row for c in ctx]
    c = top_contexts(codes, acts, tiny_model, k=1, features=[0], window=(2, 1))[0][0]
    assert c.highlight <= 2 and len(c.tokens) - c.highlight - 1 <= 1
    assert c.text("[{}]").count("[") == 1 and f"[{c.tokens[c.highlight]}]" in c.text("[{}]")
    with pytest.raises(ValueError, match="window"):
        top_contexts(codes, acts, tiny_model, window=(-1, 2))


def test_bare_tokenizer_and_wrong_tokens(acts, codes, tiny_model):
    via_model = top_contexts(codes, acts, tiny_model, k=3, features=[1])
    via_tok = top_contexts(codes, acts, tiny_model.tokenizer, k=3, features=[1])
    assert [c.to_dict() for c in via_model[1]] == [c.to_dict() for c in via_tok[1]]
    broken = acts.rows(torch.arange(len(acts)))
    broken.token = (acts.token + 1) % 1000  # as if another tokenizer had harvested
    with pytest.raises(ValueError, match="token"):
        top_contexts(codes, broken, tiny_model, k=2, features=[0])


def test_top_rows_without_enough_documents():
    doc = torch.tensor([0, 0, 0, 1])
    v = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert top_rows(v, doc, k=3) == [0, 3]
    assert top_rows(v, doc, k=3, one_per_doc=False) == [0, 1, 2]


def test_random_contexts(acts, tiny_model, codes):
    a = random_contexts(acts, tiny_model, 8, seed=3)
    b = random_contexts(acts, tiny_model, 8, seed=3, values=codes[:, 2])
    assert [c.row for c in a] == [c.row for c in b] and len({c.row for c in a}) == 8
    assert all(c.value == pytest.approx(float(codes[c.row, 2])) for c in b)
    excluded = torch.ones(len(acts), dtype=torch.bool)
    excluded[:5] = False  # only rows 0..4 allowed
    assert {c.row for c in random_contexts(acts, tiny_model, 5, 0, exclude_rows=excluded)} == set(
        range(5)
    )
    with pytest.raises(ValueError, match="only 5 rows"):
        random_contexts(acts, tiny_model, 6, 0, exclude_rows=excluded)


# --- logit lens ---------------------------------------------------------------------------------


def test_lens_equals_the_models_own_final_norm_and_unembed(tiny_model):
    """Ranking by (d * gain) @ W_U must equal ranking by unembed(ln_final(d)) (1/rms is a scalar)."""
    gain = final_norm_gain(tiny_model)
    saved = gain.clone()
    param = next(p for n, p in tiny_model.ln_final.named_parameters() if n.endswith("weight"))
    try:
        with torch.no_grad():  # a non-trivial gain, so folding it in is actually tested
            param.copy_(torch.rand(param.shape, generator=torch.Generator().manual_seed(0)) + 0.5)
        d = torch.randn(3, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
        lens = lens_extremes(d, unembedding(tiny_model), k=10)
        with torch.no_grad():
            logits = tiny_model.unembed(tiny_model.ln_final(d[:, None, :]))[:, 0]
        direct = (d * param.detach()) @ tiny_model.W_U.detach()
        assert torch.equal(lens.top_ids, direct.topk(10).indices)
        assert torch.equal(lens.bottom_ids, direct.topk(10, largest=False).indices)
        assert torch.equal(lens.top_ids, logits.topk(10).indices)
        plain = lens_extremes(d, unembedding(tiny_model, final_norm=False), k=10)
        assert not torch.equal(plain.top_ids, lens.top_ids)  # the gain changes the answer
        spread = direct.topk(10).values.mean(-1) - direct.topk(10, largest=False).values.mean(-1)
        assert torch.allclose(lens.spread, spread, atol=1e-4)
    finally:
        with torch.no_grad():
            param.copy_(saved)


# --- compatibility and labels -------------------------------------------------------------------


def test_compatibility_check():
    meta = {"hooks": [HOOK], "model": {"spec": "a", "sha256": "1" * 64}}
    good = {"hook": HOOK, "model": {"spec": "a", "sha256": "1" * 64}}
    assert check_compatible(good, meta, "1" * 64) == HOOK
    with pytest.raises(IncompatibleBasisError, match="hook"):
        check_compatible({**good, "hook": "blocks.0.hook_resid_post"}, meta)
    with pytest.raises(IncompatibleBasisError, match="model"):
        check_compatible({**good, "model": {"spec": "b", "sha256": "2" * 64}}, meta)
    with pytest.raises(IncompatibleBasisError, match="loaded model"):
        check_compatible(good, meta, "3" * 64)


def test_label_scores_and_missing_labels(tmp_path):
    entry = {"label": "animals", "detection": {"auroc": 0.8}, "control": {"auroc": 0.5}}
    assert label_scores(entry) == ("animals", 0.8, 0.5)
    old_style = {"label": "x", "detection": {"score": 0.7, "control": 0.4}}
    assert label_scores(old_style) == ("x", 0.7, 0.4)
    assert label_scores(None) == ("", None, None)
    assert load_labels(tmp_path) is None


# --- the page -----------------------------------------------------------------------------------


def test_page_structure_and_labels(tiny_model, acts, codes, tmp_path):
    svd = SVDBasis(6, hook=HOOK).fit(acts.acts[HOOK])
    labels = {2: {"label": "zebra stripes", "detection": {"auroc": 0.9}, "control": {"auroc": 0.4}}}
    page = write_dashboard(
        svd, acts, tiny_model, tmp_path, labels=labels, k=3, n_features=2, progress=False
    )
    text = page.read_text()
    assert page.name == "dashboard.html"
    assert text.count("<details class='feat'") == 2  # sections only for the first N
    for f in range(6):
        assert f">f{f}<" in text  # the index lists all
    assert "zebra stripes" in text and "0.9" in text and "shuffled-label control" in text
    assert text.count("function(") > 0 and text.count("<script>") == 2  # plotly inlined once
    no_labels = write_dashboard(svd, acts, tiny_model, tmp_path / "x.html", k=2, n_features=1)
    assert "shuffled" not in no_labels.read_text() and no_labels.name == "x.html"


def test_dashboard_renders_in_chromium(tiny_model, acts, pca, codes, tmp_path):
    browser.require_chromium()
    page = write_dashboard(pca, acts, tiny_model, tmp_path, k=4, n_features=5, progress=False)
    png = browser.render_screenshot(page, tmp_path / "shot.png")
    assert not browser.is_blank(png)
    dom = browser.dump_dom(page)
    assert 'class="main-svg"' in dom  # plotly drew the overview and the open section's plot
    assert dom.count("<mark>") >= 4


def test_is_blank_detects_a_blank_page(tmp_path):
    browser.require_chromium()
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    assert browser.is_blank(browser.render_screenshot(blank, tmp_path / "b.png", size=(300, 200)))


def test_cli_refuses_another_hook_and_renders(tiny_model, tiny_dir, tmp_path):
    from analoglock.cli.dashboard import main

    store = tmp_path / "acts"
    docs = load_documents("fable_work", split="test")[:4]
    harvest_to_disk(tiny_model, docs, [HOOK], store, progress=False)
    other = PCABasis(4, hook="blocks.0.hook_resid_post").fit(torch.randn(50, 64))
    other.save(tmp_path / "basis", model=model_info(tiny_model).to_dict())
    cfg = compose_cli("dashboard", [f"basis={tmp_path / 'basis'}", f"acts={store}"])
    assert cfg.n_features == 200 and cfg.k == 10 and cfg.label is False
    with pytest.raises(IncompatibleBasisError, match="blocks.0.hook_resid_post"):
        main.__wrapped__(cfg)
    assert json.loads((store / "meta.json").read_text())["hooks"] == [HOOK]

    good = PCABasis(4, hook=HOOK).fit(torch.randn(50, 64))
    good.save(tmp_path / "good", model=model_info(tiny_model).to_dict())
    page = tmp_path / "page.html"
    overrides = [f"basis={tmp_path / 'good'}", f"acts={store}", "model=hf", f"out={page}"]
    overrides += [f"model.spec={tiny_dir}", "n_features=2", "k=2", "progress=false"]
    cfg = compose_cli("dashboard", overrides)
    main.__wrapped__(cfg)
    assert page.read_text().count("<details class='feat'") == 2


def test_cli_refuses_a_directory_or_file_out_before_the_model(tmp_path):
    from analoglock.cli.dashboard import main

    (tmp_path / "taken").write_text("a file")
    for out, err in ((tmp_path, IsADirectoryError), (tmp_path / "taken" / "p.html", NotADirectoryError)):  # fmt: skip
        cfg = compose_cli("dashboard", [f"basis={tmp_path}", "acts=none", f"out={out}", "model=hf", "model.spec=/no/model"])  # fmt: skip
        with pytest.raises(err):
            main.__wrapped__(cfg)
