"""Training on 2 processes is training on 1: real launches (`torchrun`, gloo on CPU) of the
command line against a 1-process run of the same task, compared tensor by tensor (within 1e-5),
step by step in metrics.jsonl (each step's loss is that of the tensors the steps before made),
and on the final report.

The batches hold 3 rows, so the two processes take 2 and 1 of each (their losses weighted by
their part) and the last batch of an epoch, 1 row, leaves the second process nothing (it joins
the reduction with zero gradients). A process that stepped on its own rows' gradients, weighed
its part wrongly, or judged validation on its own slice of the rows would end elsewhere."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from typer.testing import CliRunner

from softprompt.cli import app
from softprompt.distributed import LaunchError, Processes

from helpers import write_task

STEPS = 12
EVAL_EVERY = 3
LAUNCH_TIMEOUT = 300
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# accelerate's torchrun launcher (--multi_gpu; on CPU its plain launch starts one process) on a free port
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
# distinct rows whose answers differ in length: a batch's rows then differ in loss and in target
# tokens, so a process that weighed its part by rows, or not at all, would step elsewhere
GENERATION = [(f"def f{i}(a): return a + {i * i}", f"function f{i}(a) {{ {'a = a; ' * (i % 4)}return a + {i * i}; }}")
              for i in range(12)]


def _classification_task(folder: Path, model_dir: Path) -> Path:
    return write_task(folder, model_dir, steps=STEPS, extra=", label_lr: 0.3", batch_size=3, eval_every=EVAL_EVERY,
                      data_extra=", validation_fraction: 0.25")  # fmt: skip


def _generation_task(folder: Path, model_dir: Path) -> Path:
    rows = [{"code": p, "js": j} for p, j in GENERATION]
    (folder / "gen_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "gen_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    task = folder / "gen.yaml"
    task.write_text(
        f"model: {model_dir}\n"
        "template: '{soft:4} Python: {code} JavaScript: {target}'\n"
        "data: {train: gen_train.jsonl, dev: gen_dev.jsonl, target: js, validation_fraction: 0.25}\n"
        "generation: {metrics: [chrf], max_new_tokens: 6}\n"
        f"train: {{steps: 6, batch_size: 3, lr: 0.3, eval_every: {EVAL_EVERY}}}\n"
    )
    return task


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The classification task, the same with learned label vectors (on the tiny model the
    prompt alone never beats its start on validation, so its kept state would be the initial
    one; with label vectors the state kept is a trained one), and a generation task."""
    folder = tmp_path_factory.mktemp("distributed")
    plain = _classification_task(folder, tiny_model_dir)
    labelled = plain.with_name("label_vectors.yaml")
    labelled.write_text(plain.read_text() + "label_vectors: true\n")
    return {"classification": plain, "label_vectors": labelled, "generation": _generation_task(folder, tiny_model_dir)}


def _one_process(task: Path, out: Path, *extra: str) -> Path:
    result = CliRunner().invoke(app, ["train", str(task), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return out


def _launch(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


DRIVER = """
import json, sys
from softprompt.cli import main

for args in json.loads(sys.argv[1]):  # each a `softprompt train` command line, run in turn here
    sys.argv = ["softprompt", *args]
    try:
        main()
    except SystemExit as stop:
        if stop.code:
            raise
"""


def _two_processes_each(commands: list[list[str]], folder: Path) -> None:
    """`softprompt train` command lines run in turn on 2 processes, in one launch (each launch
    costs its processes' start; the path is `-m softprompt`'s, the CLI called in each process)."""
    driver = folder / "driver.py"
    driver.write_text(DRIVER)
    launch = _launch([*TORCHRUN, str(driver), json.dumps(commands)], folder)
    output, _ = launch.communicate(timeout=LAUNCH_TIMEOUT)
    assert launch.returncode == 0, output
    assert output.count("training on 2 processes (gloo") == len(commands), output


def _killed_after_checkpoint(command: list[str], out: Path, step: int) -> int:
    """A 2-process run killed (SIGKILL: the launcher and both workers, which torchrun starts in
    sessions of their own) once its checkpoint holds `step` or later; returns the step it holds.
    The processes are stopped (SIGSTOP) while the checkpoint is read, so a tiny model's run cannot
    end between the look and the kill."""
    launch = _launch(command, out.parent)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while True:
            tree = _signal(launch, signal.SIGSTOP)
            if (saved := _checkpoint_step(out)) >= step or launch.poll() is not None or time.monotonic() > deadline:
                break
            _signal(launch, signal.SIGCONT, tree)
            time.sleep(0.01)
    finally:
        _signal(launch, signal.SIGKILL)
        output = launch.communicate()[0]
    assert saved >= step and not (out / "task.json").exists(), f"the run was not killed mid-way:\n{output}"
    return saved


def _signal(launch: subprocess.Popen, sig: int, tree: list[int] | None = None) -> list[int]:
    """Send `sig` to the launcher and every process under it (or to `tree`); returns their ids."""
    if tree is None:
        try:
            tree = [launch.pid, *(child.pid for child in psutil.Process(launch.pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            tree = [launch.pid]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return tree


def _checkpoint_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "state.json").read_text())["state"]["step"]
    except (OSError, ValueError, KeyError):
        return -1  # none yet, or between the renames of a save


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path, files: tuple[str, ...]) -> None:
    """The same tensors (within 1e-5), the same log step by step, the same kept step and report."""
    for name in files:
        got, want = load_file(str(run / name)), load_file(str(reference / name))
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=f"{name} {key}")
    log, expected = _log(run), _log(reference)
    assert [(e["step"], e.get("split")) for e in log] == [(e["step"], e.get("split")) for e in expected]
    for got, want in zip(log, expected):
        assert _close(got, want), (got, want)
    info, other = (json.loads((r / "task.json").read_text())["metrics"] for r in (run, reference))
    assert info["best_step"] == other["best_step"] and info["steps"] == other["steps"]
    assert _close(*({k: v for k, v in m["dev"].items() if isinstance(v, (int, float))} for m in (info, other)))


def _close(got: dict, want: dict) -> bool:
    """The same keys; numbers within 1e-5, anything else equal."""
    same = lambda a, b: abs(a - b) <= 1e-5 if isinstance(a, float) or isinstance(b, float) else a == b  # noqa: E731
    return got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)


def _metrics(run: Path) -> dict:
    return json.loads((run / "task.json").read_text())["metrics"]


LORA = ["--method", "lora", "--lr", "0.003"]
RUNS = {  # run name: (task, method and flags, the files compared)
    # with label vectors: on the tiny model the prompt alone never beats its start on validation
    "prompt": ("label_vectors", [], ("prompt.safetensors", "labels.safetensors")),
    "lora": ("classification", LORA, ("adapter_model.safetensors",)),
    "prompt_alone": ("classification", [], ("prompt.safetensors",)),
    "residual": ("classification", ["--method", "residual"], ("prompt.safetensors",)),
    "p-tuning": ("classification", ["--method", "p-tuning"], ("prompt.safetensors",)),
    "prefix": ("classification", ["--method", "prefix"], ("prefix.safetensors",)),
    "full": ("classification", ["--method", "full", "--steps", "6"], ("model.safetensors",)),
    "generation": ("generation", [], ("prompt.safetensors",)),
}
KILLED = ("prompt", "lora")


def _command(tasks: dict[str, Path], name: str, out: Path, *extra: str) -> list[str]:
    task, flags, _ = RUNS[name]
    return ["train", str(tasks[task]), "--out", str(out), *flags, *extra]


@pytest.fixture(scope="module")
def runs(tasks, tmp_path_factory) -> Path:
    """Every run of RUNS, on 1 process (`one/NAME`) and on 2 (`two/NAME`, all in one launch)."""
    folder = tmp_path_factory.mktemp("runs")
    _two_processes_each([_command(tasks, name, folder / "two" / name) for name in RUNS], folder)
    for name in RUNS:
        result = CliRunner().invoke(app, _command(tasks, name, folder / "one" / name))
        assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="module")
def resumed(tasks, tmp_path_factory) -> Path:
    """The prompt run killed (kill -9) mid-run under torchrun, LoRA's under accelerate launch, then
    both resumed with --resume on 2 processes."""
    folder = tmp_path_factory.mktemp("resumed")
    launchers = {"prompt": [*TORCHRUN, "-m", "softprompt"], "lora": [*ACCELERATE, "-m", "softprompt"]}
    after = {"prompt": 4, "lora": EVAL_EVERY}  # LoRA is checkpointed at validations only
    for name in KILLED:
        saved = _killed_after_checkpoint([*launchers[name], *_command(tasks, name, folder / name)], folder / name, after[name])
        assert saved < STEPS
    _two_processes_each([_command(tasks, name, folder / name, "--resume") for name in KILLED], folder)
    return folder


def test_two_processes_train_the_prompt_one_process_trains(runs):
    assert _metrics(runs / "two" / "prompt")["processes"] == 2 and _metrics(runs / "one" / "prompt")["processes"] == 1
    assert _metrics(runs / "one" / "prompt")["best_step"] > 0  # the files compared hold trained tensors
    assert_same_run(runs / "two" / "prompt", runs / "one" / "prompt", RUNS["prompt"][2])


def test_two_process_run_killed_and_resumed_ends_as_the_uninterrupted_one(runs, resumed):
    assert_same_run(resumed / "prompt", runs / "two" / "prompt", RUNS["prompt"][2])
    assert_same_run(resumed / "prompt", runs / "one" / "prompt", RUNS["prompt"][2])


def test_lora_on_two_processes_trains_as_on_one(runs):
    assert _metrics(runs / "one" / "lora")["best_step"] > 0
    assert_same_run(runs / "two" / "lora", runs / "one" / "lora", RUNS["lora"][2])


def test_lora_two_process_run_killed_and_resumed_ends_as_the_uninterrupted_one(runs, resumed):
    """Killed after a validation's checkpoint, the resumed run redoes the steps since."""
    assert_same_run(resumed / "lora", runs / "two" / "lora", RUNS["lora"][2])
    assert_same_run(resumed / "lora", runs / "one" / "lora", RUNS["lora"][2])


@pytest.mark.parametrize("name", [name for name in RUNS if name not in KILLED])
def test_every_method_trains_on_two_processes_as_on_one(runs, name):
    """The plain prompt, residual, p-tuning, prefix and full fine-tuning, and a generation task
    (its loss is the mean over target tokens, so a process weighs its part by its tokens)."""
    assert _metrics(runs / "two" / name)["processes"] == 2
    assert_same_run(runs / "two" / name, runs / "one" / name, RUNS[name][2])


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_a_sharding_configuration_is_refused_with_what_to_choose_instead(monkeypatch, kind):
    """FSDP and DeepSpeed would shard the module DDP wraps here, the trained tensors alone, while every
    process still held the whole frozen model: refused, naming the data-parallel choices."""
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: kind))
    with pytest.raises(LaunchError, match="data-parallel only.*multi-CPU or multi-GPU"):
        Processes()
