"""The package's public API: every name a notebook user reaches for resolves to the real object."""

from __future__ import annotations

import pytest


def test_every_public_name_resolves_and_unknown_names_fail():
    import analoglock as al
    from analoglock.lock.train import train

    for name in al.__all__:
        assert getattr(al, name) is not None, name
    assert al.train_lock is train
    with pytest.raises(AttributeError, match="no attribute 'steer_everything'"):
        al.steer_everything  # noqa: B018
