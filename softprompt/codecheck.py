"""Checks on generated code: does it parse, and does it pass the row's tests?

JavaScript is checked with `node --check` and run with `node` in a subprocess, in a temporary
folder, with a timeout and no network use by our side (the tests are plain assertion programs).
Python is parsed with `ast`. Where no checker is available (no `node` on PATH) the check reports
None rather than pretending.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHECKABLE = ("javascript", "python")


@dataclass
class RunResult:
    passed: bool
    detail: str  # the end of stderr, or "timeout"


def node_available() -> bool:
    return shutil.which("node") is not None


def _run_node(args: list[str], source: str, timeout: float) -> subprocess.CompletedProcess | None:
    with tempfile.TemporaryDirectory(prefix="softprompt-js-") as folder:
        path = Path(folder) / "main.js"
        path.write_text(source, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": folder, "NODE_OPTIONS": ""}
        try:
            return subprocess.run(
                ["node", *args, str(path)],
                cwd=folder,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return None


def parses(code: str, language: str) -> bool | None:
    """True/False when a checker for `language` exists here, None when not. An empty answer is
    False: both checkers accept an empty program, which is no translation."""
    if language in CHECKABLE and not code.strip():
        return False
    if language == "python":
        try:
            ast.parse(code)
            return True
        except (SyntaxError, ValueError):
            return False
    if language == "javascript" and node_available():
        done = _run_node(["--check"], code, timeout=20)
        return done is not None and done.returncode == 0
    return None


def run_tests(code: str, tests: str, timeout: float = 15.0) -> RunResult:
    """Run JavaScript `code` followed by its `tests` program; exit code 0 is a pass."""
    done = _run_node([], code + "\n" + tests, timeout)
    if done is None:
        return RunResult(False, "timeout")
    return RunResult(done.returncode == 0, done.stderr[-300:])
