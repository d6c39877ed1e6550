"""Headless Chromium for report tests: screenshot a page, dump its DOM, tell a blank PNG.

Runs Debian's `chromium` with every network feature off (the test machines have no network) and
a fresh profile per call. PNG decoding uses zlib and numpy, so no imaging library is needed.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium() -> str | None:
    """The chromium executable ($CHROMIUM, or Debian's chromium), or None when there is none."""
    import os

    return shutil.which(os.environ.get("CHROMIUM", "chromium")) or shutil.which("chromium-browser")


def require_chromium() -> str:
    """The chromium binary; skips the test on a dev box without it, but fails under CI (make test installs it)."""
    import os

    import pytest

    path = chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing under CI: `make test` should have installed it")
        pytest.skip("chromium not installed (make test adds it)")
    return path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run chromium with the offline flags and a throwaway profile."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (make test installs it with apt-get)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def render_screenshot(
    html_path: str | Path,
    png_path: str | Path,
    size: tuple[int, int] = (1200, 2000),
    timeout: float = 120,
) -> Path:
    """Screenshot a local HTML file with headless Chromium; returns the PNG path."""
    page, png = Path(html_path).resolve(), Path(png_path).resolve()
    png.unlink(missing_ok=True)
    proc = _run(
        [f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", page.as_uri()], timeout
    )
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr}")
    return png


def dump_dom(html_path: str | Path, timeout: float = 120) -> str:
    """The page's DOM after its scripts ran, as serialized by Chromium."""
    proc = _run(["--dump-dom", Path(html_path).resolve().as_uri()], timeout)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"chromium --dump-dom failed (rc {proc.returncode}): {proc.stderr}")
    return proc.stdout


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def png_pixels(png_path: str | Path) -> tuple[int, int, int, np.ndarray]:
    """(width, height, bytes per pixel, rows) of an 8-bit non-interlaced RGB/RGBA/gray PNG."""
    data = Path(png_path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{png_path} is not a PNG")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    if header is None:
        raise ValueError(f"{png_path} has no IHDR chunk")
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG (depth {depth}, color type {color}, interlace)")
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, -1)
    stride = width * channels
    rows, prev = [], np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        f, line = int(raw[y, 0]), raw[y, 1:].copy()
        if f == 1:  # Sub: a running sum per channel, mod 256
            line = np.cumsum(line.reshape(width, channels), axis=0, dtype=np.uint64)
            line = (line % 256).astype(np.uint8).reshape(-1)
        elif f == 2:
            line = line + prev  # uint8 wraps, as the filter wants
        elif f in (3, 4):  # Average / Paeth depend on the decoded left byte: sequential
            out, up = line.tolist(), prev.tolist()
            for x in range(stride):
                a = out[x - channels] if x >= channels else 0
                c = up[x - channels] if x >= channels else 0
                pred = (a + up[x]) // 2 if f == 3 else _paeth(a, up[x], c)
                out[x] = (out[x] + pred) & 0xFF
            line = np.array(out, dtype=np.uint8)
        rows.append(line)
        prev = line
    return width, height, channels, np.stack(rows)


def is_blank(png_path: str | Path, min_fraction: float = 0.002) -> bool:
    """True when fewer than min_fraction of pixels differ from the top-left pixel's colour."""
    width, height, ch, rows = png_pixels(png_path)
    pixels = rows.reshape(height, width, ch)
    differ = (pixels != pixels[0, 0]).any(axis=-1).sum()
    return int(differ) < min_fraction * width * height
