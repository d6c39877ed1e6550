"""HTML and plot rendering shared by every command (plotly; the same figures go to wandb)."""

from analoglock.reports.html import write_report

__all__ = ["write_report"]
