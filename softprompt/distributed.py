"""Training on N processes (`torchrun`, `accelerate launch`), accelerate doing the distribution.

Every process runs the whole command over the same rows in the same order; a plain run is the
case N = 1 of this one path. The processes differ in three ways only:

- each takes a fixed slice of every global micro-batch (rows rank, rank + N, ...) and scales its
  mean loss by its slice's share of the batch's loss terms (rows, or target tokens) times N. The
  gradients accelerate's DDP averages are then the gradient of the whole batch's mean loss, even
  where a batch does not divide evenly, so N processes step as one does (to float rounding);
- each predicts its slice of the rows scored (validation, dev) and all predictions are gathered in
  row order, so every process sees the same scores and keeps and stops at the same step;
- only the main process writes (the run folder, checkpoints, metrics.jsonl) and shows the console.

The reduction is torch's DistributedDataParallel as `Accelerator.prepare` sets it up (gloo on CPU,
nccl on GPUs), with `find_unused_parameters`: a batch need not touch every trained tensor (a
process whose slice is empty touches none, and joins the reduction with zero gradients).

Data parallelism only: every process holds the whole frozen model. FSDP and DeepSpeed (which shard
the model itself) are refused with a message rather than run as something they are not: the
module accelerate would shard here holds the trained tensors alone, not the frozen body.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, gather_object
from rich.console import Console


class LaunchError(ValueError):
    """The launcher or accelerate's configuration asks for what softprompt does not do."""


DATA_PARALLEL = {DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU}


class _Loss(torch.nn.Module):
    """The trained tensors as one module whose forward is the loss of some training rows: what DDP
    wraps, so that its hooks average those tensors' gradients. The tensors live where their method
    keeps them (a prompt in the method, LoRA's adapters in the base model); this only registers them."""

    def __init__(self, tensors: list[torch.nn.Parameter], loss: Callable[[list[int]], torch.Tensor]) -> None:
        super().__init__()
        self.tensors = torch.nn.ParameterList(tensors)
        self.loss = loss

    def forward(self, rows: list[int]) -> torch.Tensor:
        if not rows:  # a batch shorter than the processes: this one adds zero gradients
            return sum(t.sum() for t in self.tensors) * 0.0
        return self.loss(rows)


class Processes:
    """This process among the N that run the command (N = 1 without a launcher)."""

    def __init__(self) -> None:
        # cpu: without a GPU, a launched process must still join the others (gloo); else accelerate runs it alone
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        kind = self.accelerator.distributed_type
        if kind not in DATA_PARALLEL:
            raise LaunchError(
                f"accelerate is configured for {kind.value}: softprompt trains data-parallel only (each process "
                "holds the whole frozen model; DDP on CPUs or GPUs). Choose multi-CPU or multi-GPU in "
                "`accelerate config`, or launch with torchrun"
            )
        if self.accelerator.gradient_accumulation_steps != 1:
            raise LaunchError(
                "accelerate's gradient_accumulation_steps is set (accelerate config or environment): "
                "softprompt accumulates itself, set train.grad_accum (--grad-accum) instead"
            )

    @property
    def count(self) -> int:
        return self.accelerator.num_processes

    @property
    def index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        """This process's device: its own GPU under a launcher, else the CPU."""
        device = self.accelerator.device
        return torch.device("cpu") if device.type == "cpu" else device

    def describe(self) -> str:
        backend = self.accelerator.state.backend or "none"
        return f"{self.count} processes ({backend}, {self.accelerator.distributed_type.value})"

    # -- training -----------------------------------------------------------------------------
    def share(self, rows: Sequence[int]) -> list[int]:
        """This process's fixed slice of a global batch: every N-th row from its rank on."""
        return list(rows[self.index :: self.count])

    def weight(self, terms: Callable[[list[int]], int], mine: list[int], batch: list[int]) -> float:
        """What this process's mean loss over its rows `mine` is multiplied by: its share of the
        batch's loss terms (`terms(rows)`: rows, or target tokens) times N, so that the average of
        the N gradients is the gradient of the whole batch's mean. 1 for a process alone."""
        if self.count == 1:
            return 1.0  # its rows are the batch (and counting terms may cost an encoding)
        return terms(mine) * self.count / terms(batch)

    @contextmanager
    def trained(self, tensors: list[torch.nn.Parameter], loss: Callable[[list[int]], torch.Tensor]) -> Iterator[torch.nn.Module]:
        """The module whose calls give `loss(rows)` and whose backward passes average the
        gradients of `tensors` across the processes (DDP; the module itself when N = 1)."""
        module = self.accelerator.prepare_model(_Loss(tensors, loss), device_placement=False)
        try:
            yield module
        finally:
            self.accelerator.free_memory()  # forget it: a search trains many runs in one process

    def accumulating(self, module: torch.nn.Module, sync: bool):
        """Around a micro-batch's forward and backward: average the gradients now (`sync`, the
        step's last micro-batch) or keep accumulating them locally."""
        return nullcontext() if sync else self.accelerator.no_sync(module)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def mean(self, value: float) -> float:
        """The mean of a number over the processes (a step's loss: each holds its weighted part)."""
        tensor = torch.tensor(value, dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    # -- scoring ------------------------------------------------------------------------------
    def predicted(self, n: int, predict: Callable[[list[int]], Sequence]) -> list:
        """Predictions for rows 0..n-1, in row order: each process predicts its slice of them
        (`predict(rows)`), and every process gets all of them."""
        mine = self.share(range(n))
        gathered = gather_object(list(zip(mine, predict(mine))))
        answers: list = [None] * n
        for row, answer in gathered:
            answers[row] = answer
        return answers

    # -- what the main process alone does ------------------------------------------------------
    def shown(self, console: Console) -> Console:
        """`console` on the main process; a silent one on the others (one progress bar, one log)."""
        return console if self.is_main else Console(quiet=True)

    @contextmanager
    def folder(self, run: Path) -> Iterator[Path]:
        """Where this process writes the files of `run`: the run folder on the main process, a
        throwaway folder on the others (scoring writes its figures and predictions as it goes)."""
        if self.is_main:
            yield run
            return
        with tempfile.TemporaryDirectory(prefix="softprompt-rank") as scratch:
            yield Path(scratch)

    def wait(self) -> None:
        """Until every process gets here (before the main process writes what others still read)."""
        self.accelerator.wait_for_everyone()


@functools.cache
def processes() -> Processes:
    """This process's place among those the launcher started (made once per process)."""
    return Processes()
