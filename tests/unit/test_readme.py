"""Every `analoglock-*` command in README.md composes with the options it names; no model runs.

The fast twin of `make readme-check` (scripts/readme_check.py, which runs the commands): each
command is split as the shell splits it, a `--multirun` sweep is expanded into its jobs, and the
overrides are composed into the command's real config, as written and with the check's smaller
sizes. A README option that no longer exists, a mandatory value it forgets, or an input path
that no earlier command writes fails here.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser

from analoglock.cli._conf import CONF_MODULE
from tests.unit.test_configs import ENTRY_CONFIGS, compose_resolved

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIG_OF = {script: name for name, script in ENTRY_CONFIGS.items()}
HYDRA_FLAGS = {"--multirun", "-m"}
# Overrides that name a directory an earlier command must have written.
INPUT_KEYS = ("acts", "basis", "upstream", "downstream", "few", "many", "ckpt")
# Makefile targets the README runs: their analoglock commands are checked like the README's own.
MAKE_TARGETS = ("make run", "make harvest", "make lre")


def _readme_check():
    spec = importlib.util.spec_from_file_location("readme_check", ROOT / "scripts" / "readme_check.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


readme_check = _readme_check()


def jobs(argv: list[str]) -> list[list[str]]:
    """The override lists of the jobs a command line starts (one per value of a sweep)."""
    flags = [a for a in argv if a.startswith("-")]
    assert set(flags) <= HYDRA_FLAGS, f"unexpected flags {flags}"
    args = [a for a in argv if not a.startswith("-")]
    per_arg = []
    for arg, override in zip(args, OverridesParser.create().parse_overrides(args), strict=True):
        if override.is_sweep_override():
            assert flags, f"{arg} is a sweep: it needs --multirun"
            key = override.get_key_element()
            per_arg.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            per_arg.append([arg])
    return [list(combo) for combo in itertools.product(*per_arg)]


def cases(with_check_args: bool):
    """pytest params: (config name, overrides) per job of every README analoglock command."""
    out = []
    for step, script, argv in readme_check.analoglock_commands(README, with_check_args):
        assert script in CONFIG_OF, f"README.md:{step.line}: unknown command {script}"
        for n, overrides in enumerate(jobs(argv)):
            out.append(pytest.param(CONFIG_OF[script], overrides, id=f"README.md:{step.line}-{script}-{n}"))  # fmt: skip
    return out


def test_readme_shows_every_command():
    shown = {script for _, script, _ in readme_check.analoglock_commands(README)}
    assert shown == set(ENTRY_CONFIGS.values())


@pytest.mark.parametrize(("name", "overrides"), cases(with_check_args=False))
def test_readme_command_composes_as_written(name, overrides):
    with initialize_config_module(CONF_MODULE, version_base=None):
        compose_resolved(name, overrides, fill_missing=False)


@pytest.mark.parametrize(("name", "overrides"), cases(with_check_args=True))
def test_readme_command_composes_at_check_sizes(name, overrides):
    with initialize_config_module(CONF_MODULE, version_base=None):
        compose_resolved(name, overrides, fill_missing=False)


def makefile_commands(target: str) -> list[list[str]]:
    """The analoglock commands of a Makefile target's recipe, variables expanded, as argv lists."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")  # joined lines
    variables = dict(re.findall(r"^(\w+)\s*[?:]?=\s*(.*)$", text, flags=re.M))
    variables["VENV"] = ".venv"
    recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, flags=re.M).group(1)
    out = []
    for line in recipe.splitlines():
        line = line.strip()
        while "$(" in line:  # variables may name variables
            line = re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], line)
        out += [w for w in readme_check.shell_commands(line) if Path(w[0]).name in CONFIG_OF]
    return out


@pytest.mark.parametrize("target", MAKE_TARGETS)
def test_make_targets_the_readme_runs_compose(target):
    commands = makefile_commands(target.split()[1])
    assert commands, f"{target} runs no analoglock command"
    with initialize_config_module(CONF_MODULE, version_base=None):
        for words in commands:
            for overrides in jobs(words[1:]):
                compose_resolved(CONFIG_OF[Path(words[0]).name], overrides, fill_missing=False)


def test_every_input_is_written_by_an_earlier_command():
    """A README command may read only what a command above it (or a make target it ran) wrote."""
    commands = []  # (README line, argv), Makefile targets expanded in place
    for step in readme_check.steps(README):
        if step.kind != "bash" or step.skip:
            continue
        for words in readme_check.shell_commands(readme_check.strip_comment(step.text)):
            if " ".join(words) in MAKE_TARGETS:
                commands += [(step.line, w) for w in makefile_commands(words[1])]
            elif Path(words[0]).name in CONFIG_OF:
                commands.append((step.line, words))
    written: set[str] = set()
    missing = []
    with initialize_config_module(CONF_MODULE, version_base=None):
        for line, words in commands:
            script = Path(words[0]).name
            for overrides in jobs(words[1:]):
                cfg = compose_resolved(CONFIG_OF[script], overrides, fill_missing=False)
                for key in INPUT_KEYS:
                    value = cfg.get(key)
                    if isinstance(value, str) and "/" in value and value not in written:
                        missing.append(f"README.md:{line} {script} {key}={value}")
                if cfg.get("out_dir") is not None:
                    written.add(str(cfg.out_dir))
    assert not missing, "inputs no earlier README command writes:\n" + "\n".join(missing)


def test_trace_target_keeps_its_leading_space():
    """`target=" down"` unquoted reaches the program as `down`; the README must quote it."""
    traces = [argv for _, script, argv in readme_check.analoglock_commands(README) if script == "analoglock-trace"]  # fmt: skip
    assert traces
    with initialize_config_module(CONF_MODULE, version_base=None):
        for argv in traces:
            cfg = compose_resolved("trace", argv, fill_missing=False)
            if cfg.target_id is None:
                assert cfg.target.startswith(" "), f"target={cfg.target!r} lost its space"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("a b  # readme-check: c=1", ("a b", "c=1", False)),
        ("make test", ("make test", "", True)),
        ("x 'y # not a comment'  # readme-check: skip", ("x 'y # not a comment'", "", True)),
        ("printf '%s\\n' a > f.txt  # one per line", ("printf '%s\\n' a > f.txt", "", False)),
    ],
)
def test_readme_check_reads_its_comments(line, expected):
    (step,) = readme_check.steps(f"```bash\n{line}\n```\n")
    assert (readme_check.strip_comment(step.text), step.check_args, step.skip) == expected


def test_check_resumes_only_an_earlier_clone_and_from_a_real_step(tmp_path):
    """--from N skips steps 1..N-1, so it must point at a clone an earlier check made."""
    import subprocess

    def run(*args: str) -> subprocess.CompletedProcess:
        script = ROOT / "scripts" / "readme_check.py"
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)

    n = len(readme_check.steps(README))
    bad = run("--from", str(n + 1))
    assert bad.returncode == 2 and f"steps 1-{n}" in bad.stderr
    no_clone = run("--from", "2", "--dir", str(tmp_path / "nothing-here"))
    assert no_clone.returncode == 2 and "earlier check's clone" in no_clone.stderr
