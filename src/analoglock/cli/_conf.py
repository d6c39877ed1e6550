"""Where the Hydra configs live, for every entry point."""

from pathlib import Path

# conf/ sits at the repository root, beside src/ (editable installs keep it reachable).
CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")
