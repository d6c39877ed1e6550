"""Atomic file writes: a temp file beside the target, then a rename, so readers never see half a file.

Every artifact gets mode 0644 (owner writes, everyone reads), like any file a user's shell
creates, whatever the temp file was created with; JSON is strict (no bare NaN or Infinity, which
browsers and most JSON parsers reject). A leaf: imports nothing of analoglock.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ARTIFACT_MODE = 0o644  # chosen on purpose: artifacts are meant to be shared and read by others


def _tmp(path: Path) -> Path:
    """A hidden temp name in the same directory (rename is atomic only within a filesystem)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _publish(tmp: Path, path: Path) -> None:
    """Give the temp file the artifact mode, then rename it into place."""
    os.chmod(tmp, ARTIFACT_MODE)
    os.replace(tmp, path)


def check_out_dir(path: str | Path) -> Path:
    """An output directory path that is, or can become, a directory; refuses a path that is a
    regular file (or lies under one) with a message naming it. Creates nothing."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if p.is_dir():
                break
            where = f"out_dir {path}" if p == path else f"{p}, a parent of out_dir {path},"
            raise NotADirectoryError(
                f"{where} is a file, not a directory; choose another out_dir or move the file away."
            )
    return path


def finite(obj: Any) -> Any:
    """NaN/inf floats -> None, recursively through dicts, lists and tuples (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write indented, strict JSON atomically: NaN and +-inf become null (an undefined number,
    e.g. a correlation of a constant column, is "no value", never a non-standard token)."""
    write_text(path, json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """safetensors save, atomically."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
