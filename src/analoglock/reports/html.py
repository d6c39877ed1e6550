"""A standalone HTML page of plotly figures and small tables."""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go

from analoglock.atomic import write_text


def write_report(
    path: str | Path,
    title: str,
    figures: dict[str, go.Figure],
    tables: dict[str, dict] | None = None,
) -> Path:
    """Write figures (plotly.js inlined once, so the page works offline) and key/value tables."""
    path = Path(path)
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    for name, table in (tables or {}).items():
        rows = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
            for k, v in table.items()
        )
        parts.append(
            f"<h2>{html.escape(name)}</h2><table border='1' cellpadding='4'>{rows}</table>"
        )
    for i, (name, fig) in enumerate(figures.items()):
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
    parts.append("</body></html>")
    write_text(path, "\n".join(parts))
    return path
