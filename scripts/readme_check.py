"""Run every command and Python block of README.md, in order, on a fresh clone; print which fail.

A README is a promise: each command it prints must work as written, after the ones before it.
This script takes the fenced ```bash and ```python blocks of README.md in order, joins `\\`
continuations, and runs each shell line (through bash, in the clone's root) and each Python
block (with the clone's `.venv/bin/python`). A shell line may end in a comment holding
`readme-check: ARGS`: the check appends ARGS to the command (later Hydra overrides win), so a
slow command runs at a small size; `readme-check: skip` skips a line. `make test` is skipped
(it is what CI runs, and it holds this check's fast twin, tests/unit/test_readme.py).

    python scripts/readme_check.py                    # git clone of HEAD into a temp dir
    python scripts/readme_check.py --in-place         # this checkout (uses and writes its runs/)
    python scripts/readme_check.py --list             # print the steps, run nothing
    python scripts/readme_check.py --keep-going --timeout 3600
    python scripts/readme_check.py --dir DIR --from 12   # rerun an earlier check's clone from step 12

Exit status: 0 when every step passed, 1 otherwise. A fresh clone's `make run` creates the
virtual environment (it needs the package index the Makefile installs from).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK_MARK = "readme-check:"
ALWAYS_SKIPPED = ("make test",)  # what CI runs; it already contains tests/unit/test_readme.py
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Step:
    """One thing the README tells a user to run."""

    kind: str  # "bash" | "python"
    text: str  # the command line (continuations joined) or the whole Python block
    line: int  # where it starts in README.md (1-based)
    check_args: str = ""  # `# readme-check: ...` arguments appended when checking
    skip: bool = False

    @property
    def to_run(self) -> str:
        """What the check runs: the command without its comment, plus the check's arguments."""
        if self.kind == "python":
            return self.text
        return " ".join(p for p in (strip_comment(self.text), self.check_args) if p)


def strip_comment(line: str) -> str:
    """A shell line without its trailing comment (a `#` outside quotes that starts a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def blocks(readme: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced code block."""
    out, lang, start, body = [], None, 0, []
    for n, line in enumerate(readme.splitlines(), 1):
        m = FENCE.match(line)
        if m and lang is None:
            lang, start, body = m.group(1) or "text", n + 1, []
        elif line.strip() == "```" and lang is not None:
            out.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return out


def steps(readme: str) -> list[Step]:
    """Every shell command and Python block of the README, in order."""
    found: list[Step] = []
    for lang, start, body in blocks(readme):
        if lang == "python":
            found.append(Step("python", "\n".join(body), start))
        elif lang in ("bash", "sh", "shell", "console"):
            pending, first = "", start
            for n, line in enumerate(body, start):
                if not pending:
                    first = n
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1].rstrip() + " "
                    continue
                full = (pending + line.strip()).strip()
                pending = ""
                if not full or full.startswith("#"):
                    continue
                comment = full[len(strip_comment(full)) :]
                args = ""
                if CHECK_MARK in comment:
                    args = comment.split(CHECK_MARK, 1)[1].strip()
                command = strip_comment(full)
                skip = args == "skip" or command.startswith(ALWAYS_SKIPPED)
                found.append(Step("bash", full, first, "" if skip else args, skip))
    return found


def analoglock_commands(
    readme: str, with_check_args: bool = False
) -> list[tuple[Step, str, list[str]]]:
    """(step, console script, argv) of every `analoglock-*` invocation, as the shell splits it.

    `with_check_args`: the command as the check runs it, its `readme-check:` arguments appended.
    """
    out = []
    for step in steps(readme):
        if step.kind != "bash" or step.skip:
            continue
        line = step.to_run if with_check_args else strip_comment(step.text)
        for words in shell_commands(line):
            if words and Path(words[0]).name.startswith("analoglock-"):
                out.append((step, Path(words[0]).name, words[1:]))
    return out


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at `&&`, `||`, `;`, `|`), each as its argv."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def run_step(
    step: Step, cwd: Path, timeout: float, log_dir: Path, index: int
) -> tuple[bool, float]:
    """Run one step in `cwd`; its output goes to log_dir/<index>.log. (passed, seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = log_dir / f"{index:02d}.log"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        out.write(f"$ {step.to_run}\n")
        out.flush()
        if step.kind == "python":
            script = log_dir / f"{index:02d}.py"
            script.write_text(step.text + "\n", encoding="utf-8")
            argv = [str(cwd / ".venv" / "bin" / "python"), str(script)]
        else:
            argv = ["bash", "-o", "pipefail", "-c", step.to_run]
        try:
            rc = subprocess.run(
                argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[readme-check] timed out after {timeout:.0f} s\n")
            rc = 124
    return rc == 0, time.perf_counter() - t0


def tail(path: Path, n: int = 15) -> str:
    """The last `n` lines of a log, indented."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    return "\n".join("      " + line for line in lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--in-place", action="store_true", help="run in this checkout, not a clone")
    ap.add_argument("--dir", type=Path, help="clone into this (empty or absent) directory")
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    ap.add_argument("--keep-going", action="store_true", help="run the rest after a failure")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    ap.add_argument(
        "--from",
        dest="start",
        type=int,
        default=1,
        help="start at step N (with --in-place or --dir of an earlier check: after fixing step N, "
        "rerun from it without redoing the steps before, whose outputs are already there)",
    )
    args = ap.parse_args()

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    todo = steps(readme)
    if args.list:
        for i, step in enumerate(todo, 1):
            flag = "skip" if step.skip else step.kind
            print(f"{i:2d}. [{flag}] README.md:{step.line}: {step.to_run.splitlines()[0]}")
        return 0

    if not 1 <= args.start <= len(todo):
        ap.error(f"--from {args.start}: the README has steps 1-{len(todo)} (see --list)")
    if args.in_place:
        cwd = ROOT
    elif args.start > 1:
        if args.dir is None or not (args.dir / "README.md").exists():
            ap.error("--from N > 1 needs --in-place or --dir of an earlier check's clone")
        cwd = args.dir
        print(f"resuming the check in {cwd} at step {args.start}")
    else:
        cwd = args.dir or Path(tempfile.mkdtemp(prefix="analoglock-readme-"))
        subprocess.run(["git", "clone", "-q", str(ROOT), str(cwd)], check=True)
        print(f"fresh clone of HEAD in {cwd} (uncommitted changes are not in it)")
    log_dir = cwd / "runs" / "readme-check"
    log_dir.mkdir(parents=True, exist_ok=True)

    failed: list[int] = []
    for i, step in enumerate(todo, 1):
        head = f"{i:2d}. README.md:{step.line}: {step.to_run.splitlines()[0][:100]}"
        if step.skip or i < args.start:
            print(f"SKIP {head}{'' if step.skip else ' (before --from)'}", flush=True)
            continue
        if failed and not args.keep_going:
            print(f"---- {head} (not run: an earlier step failed)", flush=True)
            continue
        ok, seconds = run_step(step, cwd, args.timeout, log_dir, i)
        print(f"{'ok  ' if ok else 'FAIL'} {head}  ({seconds:.0f} s)", flush=True)
        if not ok:
            failed.append(i)
            print(tail(log_dir / f"{i:02d}.log"), flush=True)
    print(f"\n{len(todo) - len(failed)} of {len(todo)} steps passed or skipped; logs in {log_dir}")
    if failed:
        print("failed: " + ", ".join(f"step {i} (README.md:{todo[i - 1].line})" for i in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
