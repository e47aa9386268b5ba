"""Checks on generated code: does it parse, and does it pass the row's tests?

JavaScript is checked with `node --check` and run with `node` in a subprocess, in a temporary
folder, with a timeout and no network use by our side (the tests are plain assertion programs).
Generated code is untrusted, so node runs under resource limits: its address space, CPU time and
file sizes are capped (setrlimit, inherited by anything it starts), its heap is capped
(`--max-old-space-size`), and on a timeout its whole process group is killed.
Python is parsed with `ast`. Where no checker is available (no `node` on PATH) the syntax check
reports None rather than pretending (parse_rate is then left out); running tests (pass_rate)
cannot be skipped silently, so there a missing node is an error saying how to install it.
"""

from __future__ import annotations

import ast
import math
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .taskfile import TaskError

CHECKABLE = ("javascript", "python")
NODE_INSTALL = "install Node.js so that `node` is on PATH (e.g. `apt-get install nodejs`)"

# What one run of generated JavaScript may take. V8 reserves far more address space than it uses:
# 2 GiB leaves node (20) room to start and a 512 MB heap, and stops a program that allocates
# gigabytes (large buffers live outside the heap). Programs needing WebAssembly memories (which
# reserve ~10 GB each) are not what the tests of a translation are.
ADDRESS_SPACE = 2 << 30
HEAP_MB = 512
FILE_SIZE = 16 << 20  # bytes any file it writes may reach


class NodeMissing(TaskError):
    """A metric that runs JavaScript (pass_rate) was asked for, and `node` is not on PATH."""


@dataclass
class RunResult:
    passed: bool
    detail: str  # the end of stderr, or "timeout"


def node_available() -> bool:
    return shutil.which("node") is not None


def node_metrics(metrics: list[str], language: str | None, tests_column: str | None) -> list[str]:
    """The metrics among `metrics` that run node: pass_rate (with a tests column) and parse_rate
    of JavaScript."""
    needs = []
    if "parse_rate" in metrics and language == "javascript":
        needs.append("parse_rate")
    if "pass_rate" in metrics and tests_column:
        needs.append("pass_rate")
    return needs


def require_node(metric: str = "pass_rate") -> None:
    """Refuse (NodeMissing, a user error the CLI prints) when node is not on PATH."""
    if not node_available():
        raise NodeMissing(
            f"{metric} runs the generated JavaScript against each row's tests with node, and node is not "
            f"on PATH: {NODE_INSTALL}, or drop {metric} from generation.metrics"
        )


def _limits(timeout: float) -> list[tuple[int, int]]:
    """(resource, limit) for each limit set on node, never above the hard limit we run under."""
    cpu = math.ceil(2 * timeout) + 1  # CPU seconds of all its threads; the wall-clock timeout comes first
    wanted = [
        (resource.RLIMIT_AS, ADDRESS_SPACE),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, FILE_SIZE),
        (resource.RLIMIT_CORE, 0),
    ]
    out = []
    for which, value in wanted:
        hard = resource.getrlimit(which)[1]
        out.append((which, value if hard == resource.RLIM_INFINITY else min(value, hard)))
    return out


def _run_node(args: list[str], source: str, timeout: float) -> subprocess.CompletedProcess | None:
    """node on `source` under the limits; None on a timeout. NodeMissing without node."""
    limits = _limits(timeout)

    def limit() -> None:  # in the child, between fork and exec: only setrlimit calls
        for which, value in limits:
            resource.setrlimit(which, (value, value))

    with tempfile.TemporaryDirectory(prefix="softprompt-js-") as folder:
        path = Path(folder) / "main.js"
        path.write_text(source, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": folder, "NODE_OPTIONS": ""}
        command = ["node", f"--max-old-space-size={HEAP_MB}", *args, str(path)]
        try:
            process = subprocess.Popen(
                command,
                cwd=folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=limit,
                start_new_session=True,  # its own process group, killed whole on a timeout
            )
        except FileNotFoundError as err:
            raise NodeMissing(f"node could not be started ({err}): {NODE_INSTALL}") from err
        with process:
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
                return None
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


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
    """Run JavaScript `code` followed by its `tests` program; exit code 0 is a pass. NodeMissing
    (a clear error, not a traceback) when node is not on PATH."""
    require_node("pass_rate")
    done = _run_node([], code + "\n" + tests, timeout)
    if done is None:
        return RunResult(False, "timeout")
    return RunResult(done.returncode == 0, done.stderr[-300:])
