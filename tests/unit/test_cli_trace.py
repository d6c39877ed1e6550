"""analoglock-trace's own work: the target token (text or id) and the output folder it writes."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module

from analoglock.cli import trace as trace_cli
from analoglock.cli._conf import CONF_MODULE
from tests.helpers import embedded_tokenizer

DOWN = 1187  # " down" in SmolLM2's vocabulary (with its leading space)


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


def test_target_id_names_the_token_the_shell_cannot_mangle(tokenizer):
    assert trace_cli.target_text(tokenizer, "ignored", DOWN) == " down"
    assert trace_cli.target_text(tokenizer, " down", None) == " down"


def test_target_id_that_is_not_a_whole_token_is_refused(tokenizer):
    with pytest.raises(SystemExit, match="target_id=111"):
        trace_cli.target_text(tokenizer, " down", 111)  # a lone UTF-8 byte decodes to U+FFFD


def test_default_timestamped_out_dir_is_created_before_the_work(tiny_model, monkeypatch, tmp_path):
    """The default out_dir (runs/trace/<time>) does not exist yet; the results must still land."""
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_backwards(model, basis, docs, target, **kwargs):
        seen["target"] = target
        return {"target": target, "n_prompts": len(docs), "dropped": []}

    monkeypatch.setattr("analoglock.bases.load_basis", lambda path: object())
    monkeypatch.setattr("hydra.utils.instantiate", lambda cfg, *a, **k: tiny_model)
    monkeypatch.setattr("analoglock.patching.backwards.trace_backwards", fake_backwards)
    monkeypatch.setattr(
        "analoglock.reports.chains.write_trace_report", lambda path, *a: path.write_text("ok")
    )
    with initialize_config_module(CONF_MODULE, version_base=None):
        cfg = compose(
            "trace",
            overrides=["basis=b", "analysis=backwards", "prompt_prefix=down/", f"target_id={DOWN}"],
        )
    trace_cli.main.__wrapped__(cfg)
    (out_dir,) = (tmp_path / "runs" / "trace").iterdir()
    assert json.loads((out_dir / "trace.json").read_text())["backwards"]["target"] == " down"
    assert (out_dir / "report.html").read_text() == "ok"
    assert seen["target"] == " down"
