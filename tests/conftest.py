"""Shared fixtures: a tiny random Llama (fast unit tests) and the real SmolLM2 (loaded once)."""

from __future__ import annotations

import os

import pytest
import torch

# Nothing may reach a hub during tests; an unknown name must fail fast with our error.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from tests.helpers import tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A local Hugging Face directory: random 4-layer Llama + the embedded model's tokenizer."""
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """The tiny model loaded through analoglock's own local-directory path."""
    from analoglock.model import load_model

    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct, loaded once per test session."""
    from analoglock.model import load_model

    torch.manual_seed(0)
    return load_model("smollm2")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    on a shared 2-core machine, 2 threads under load made a 5-token SmolLM2 forward 40x slower
    (6 s vs 0.15 s, OpenMP barriers); modules of many small passes use this."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
