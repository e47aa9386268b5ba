"""The request scheduler: one worker thread owns the model and gathers requests into batches.

Concurrent requests wait up to `window_ms` to be gathered (at most `max_rows` rows and
`max_tasks` distinct tasks per batch), then run as one batch, rows of different tasks together.
Generation runs one token per step in one decoding that rows join and leave (continuous batching):
between two steps the worker answers every classification request waiting at that moment, lets
waiting generations join the decoding while it holds fewer than `max_rows` rows, and answers the
classifications that arrived during their prefill before it steps. So a short classification waits
at most one decoding step (or one joining prefill) behind a long generation, never for the whole
answer, and a long answer never keeps short ones waiting for a batch. Beam search (a task trained
with num_beams > 1) runs whole, as its own batch. A busy server's decoding may never drain, so it
forgets each job's rows once the job is answered (`Decoding.compact`): nothing grows with its age.

`stop()` answers every job: those still waiting fail at once, those in the decoding when the worker
ends its round, and a job submitted later fails as it is submitted; all with `SchedulerStopped`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..generate import DecodeConfig, Decoding, answer_text
from .bank import Prepared, ServedTask, TaskBank
from .telemetry import Telemetry


class QueueFull(RuntimeError):
    """More rows are waiting than the server accepts."""


class SchedulerStopped(RuntimeError):
    """The scheduler is stopping (the server shuts down): the job was not run, or not to its end."""


@dataclass
class Job:
    """One request: its prepared rows and what to do with the answers."""

    kind: str  # classify | generate
    task: ServedTask
    inputs: list[dict[str, str]]
    config: DecodeConfig | None = None
    on_token: Callable[[int, str], None] | None = None  # (row, text piece), while decoding
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # the client went away: stop spending compute on it
    prepared: Prepared | None = None  # rendered by the worker (a prefix may need the model)
    answer_only: bool = False  # classify: each row's label index, no probabilities (the pruned search)

    @property
    def rows(self) -> int:
        return len(self.inputs)


@dataclass
class _Running:
    """The decoding in progress and, for each of its rows, the job and that job's row index."""

    decoding: Decoding
    owners: list[tuple[Job | None, int]]  # None once the job is answered and its rows released
    texts: list[str]  # text streamed so far per decoding row
    left: dict[int, int]  # id(job) -> rows still decoding
    members: dict[int, list[tuple[int, int]]]  # id(job) -> (decoding row, job row) of each of its rows

    def compact(self) -> None:
        """Forget the released rows (`Decoding.compact`), renumbering what is kept per row to match."""
        numbers = self.decoding.compact()
        self.owners = [self.owners[old] for old in numbers]
        self.texts = [self.texts[old] for old in numbers]
        self.members = {job: [(numbers[r], i) for r, i in rows] for job, rows in self.members.items()}


class Scheduler:
    def __init__(
        self,
        bank: TaskBank,
        telemetry: Telemetry,
        window_ms: float = 5.0,
        max_rows: int = 16,
        max_tasks: int = 8,
        max_queue_rows: int = 256,
    ) -> None:
        self.bank = bank
        self.telemetry = telemetry
        self.window = window_ms / 1000
        self.max_rows = max_rows
        self.max_tasks = max_tasks
        self.max_queue_rows = max_queue_rows
        self.classify_queue: deque[Job] = deque()
        self.generate_queue: deque[Job] = deque()
        self.running: _Running | None = None
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._work, name="softprompt-scheduler", daemon=True)
        self._in_hand: list[Job] = []  # the jobs of the batch being run, failed together if it fails

    def start(self) -> Scheduler:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Fail the waiting jobs now and take no more; the worker ends its round, fails what it was
        decoding and exits (waited for up to 10 s)."""
        with self.wake:
            self.stopping = True
            waiting = [*self.classify_queue, *self.generate_queue]
            self.classify_queue.clear()
            self.generate_queue.clear()
            self.telemetry.queue_rows.set(0)
            self.wake.notify_all()
        for job in waiting:
            _refuse(job)
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    # -- submitting ----------------------------------------------------------------------------
    def queued_rows(self) -> int:
        return sum(j.rows for j in self.classify_queue) + sum(j.rows for j in self.generate_queue)

    def submit(self, job: Job) -> Future:
        """Queue a job; its future holds the answer, or SchedulerStopped once `stop()` was called."""
        with self.wake:
            if self.stopping:
                _refuse(job)
                return job.future
            waiting = self.queued_rows()
            if waiting + job.rows > self.max_queue_rows:
                raise QueueFull(
                    f"{waiting} rows are already waiting (limit {self.max_queue_rows}): retry shortly"
                )
            (self.classify_queue if job.kind == "classify" else self.generate_queue).append(job)
            self.telemetry.queue_rows.set(self.queued_rows())
            self.wake.notify()
        return job.future

    # -- the worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wake:
                while not (self.stopping or self.classify_queue or self.generate_queue or self.running):
                    self.wake.wait()
                if self.stopping:
                    break
            self._gather_window()
            self._guard(self._classify_waiting)
            self._guard(self._start_waiting_generations)
            self._guard(self._classify_waiting)  # what arrived during the joining rows' prefill
            self._guard(self._step_decodings)
        decoding = [job for job, _ in self.running.owners if job is not None] if self.running else []
        for job in decoding:  # taken, so running: their futures can no longer be cancelled
            if not job.future.done():
                job.future.set_exception(SchedulerStopped("the server is shutting down: the answer was not finished"))

    def _guard(self, work: Callable[[], None]) -> None:
        """A failure fails the jobs it touched, never the worker."""
        try:
            work()
        except Exception as err:  # noqa: BLE001 - the worker must outlive any one bad batch
            for job in self._in_hand:
                if not job.future.done():
                    job.future.set_exception(err)
            if work == self._step_decodings:  # drop the decoding that failed; waiting requests go on
                self.running = None
        finally:
            self._in_hand = []

    def _gather_window(self) -> None:
        """With nothing decoding, wait up to the window for more requests to join the batch."""
        if self.running or self.window <= 0:
            return
        deadline = time.perf_counter() + self.window
        with self.wake:
            while self.queued_rows() < self.max_rows and not self.stopping:
                left = deadline - time.perf_counter()
                if left <= 0:
                    return
                self.wake.wait(left)

    def _take(self, queue: deque[Job], room: int | None = None, tasks: set[str] | None = None) -> list[Job]:
        """Jobs from the front of a queue, up to `room` rows (default max_rows) and max_tasks distinct
        tasks counting `tasks` already in the batch (a job larger than max_rows still goes, alone)."""
        taken: list[Job] = []
        room = self.max_rows if room is None else room
        rows, tasks = 0, set(tasks or ())
        full = bool(tasks)  # joining a batch that already has rows: no oversized job
        with self.wake:
            while queue:
                job = queue[0]
                if job.cancelled:
                    queue.popleft()
                    job.future.cancel()
                    continue
                more_tasks = tasks | {job.task.digest}
                if (taken or full) and (rows + job.rows > room or len(more_tasks) > self.max_tasks):
                    break
                queue.popleft()
                # Running, its future can no longer be cancelled (a client leaving cancels it), so
                # answering it cannot raise and fail the rest of its batch; job.cancelled still stops it.
                if not job.future.set_running_or_notify_cancel():
                    continue
                taken.append(job)
                rows, tasks = rows + job.rows, more_tasks
            self.telemetry.queue_rows.set(self.queued_rows())
        now = time.perf_counter()
        for job in taken:
            self.telemetry.queue_wait.observe(now - job.enqueued)
        if taken:
            self.telemetry.batch_rows.observe(rows)
            self.telemetry.batch_tasks.observe(len(tasks))
        return taken

    def _classify_waiting(self) -> None:
        # Only the jobs waiting now: ones that arrive meanwhile wait for the next round, or a steady
        # stream of classifications would starve the decodings (and the waiting generations).
        waiting = len(self.classify_queue)
        while waiting > 0 and self.classify_queue:
            jobs = self._in_hand = self._take(self.classify_queue)
            if not jobs:
                return
            waiting -= len(jobs)
            for job in jobs:
                job.prepared = self.bank.prepare(job.task, job.inputs)
            scored = [j for j in jobs if not j.answer_only]  # every label's probability
            answered = [j for j in jobs if j.answer_only]  # the label alone
            probs = self.bank.classify_prepared([j.prepared for j in scored]) if scored else []
            labels = self.bank.answer_prepared([j.prepared for j in answered]) if answered else []
            for group, results in ((scored, probs), (answered, labels)):
                start = 0
                for job in group:
                    job.future.set_result(results[start : start + job.rows])
                    start += job.rows

    def _start_waiting_generations(self) -> None:
        running = self.running
        active = len(running.decoding.active) if running else 0
        if active >= self.max_rows or not self.generate_queue:
            return
        tasks = {running.owners[row][0].task.digest for row in running.decoding.active} if running else set()
        jobs = self._in_hand = self._take(self.generate_queue, self.max_rows - active, tasks)
        for job in jobs:
            job.prepared = self.bank.prepare(job.task, job.inputs)
        for job in [j for j in jobs if j.config.num_beams > 1]:
            tokens = job.prepared.task.model.beam_search(job.prepared.prefix, job.prepared.encoded.bodies, job.config)
            texts = [answer_text(self.bank.backbone, t, job.config.stop) for t in tokens]
            for row, text in enumerate(texts):
                if job.on_token:
                    job.on_token(row, text)
            job.future.set_result([_answer(job, r, t, k) for r, (t, k) in enumerate(zip(texts, tokens))])
        plain = [j for j in jobs if j.config.num_beams <= 1]
        if not plain:
            return
        batch = [(j.prepared, j.config) for j in plain]
        if running is None or running.decoding.done:
            running = self.running = _Running(self.bank.start_decoding(batch), [], [], {}, {})
        else:
            self.bank.join_decoding(running.decoding, batch)
        for job in plain:
            running.members[id(job)] = [(len(running.owners) + row, row) for row in range(job.rows)]
            running.owners += [(job, row) for row in range(job.rows)]
            running.left[id(job)] = job.rows
        running.texts += [""] * sum(j.rows for j in plain)

    def _step_decodings(self) -> None:
        run = self.running
        if run is None:
            return
        active = [(row, run.owners[row][0]) for row in run.decoding.active]
        self._in_hand = list({id(job): job for _, job in active}.values())
        for row, job in active:
            if job.cancelled:
                run.decoding.cancel(row)
        for row, _token, finished in run.decoding.step():
            self._emit(run, row, finished)
        if run.decoding.done:
            self.running = None
        elif run.decoding.released >= self.max_rows:
            run.compact()

    def _emit(self, run: _Running, row: int, finished: bool) -> None:
        """Stream the new text of a decoding row; complete its job when its last row finishes."""
        job, index = run.owners[row]
        text = run.decoding.text(row)
        if not finished:
            if text.endswith("\ufffd"):
                return  # a character split across tokens: send it whole with the next token
            text = text[: len(text) - _stop_start(text, job.config.stop)]
        if job.on_token and not job.cancelled and text != run.texts[row] and text.startswith(run.texts[row]):
            job.on_token(index, text[len(run.texts[row]) :])
        run.texts[row] = text
        if not finished:
            return
        run.left[id(job)] -= 1
        if run.left[id(job)] > 0:
            return
        rows = run.members.pop(id(job))
        answers = [_answer(job, i, run.decoding.text(r), run.decoding.generated[r]) for r, i in rows]
        for r, i in rows:  # a decoding that never empties must not keep every answered row
            run.decoding.release(r)
            run.owners[r], run.texts[r] = (None, i), ""
        del run.left[id(job)]
        if not job.future.done():
            job.future.set_result(answers)  # last: whoever reads the answer finds the rows released


def _refuse(job: Job) -> None:
    """Fail a job that never ran (a client that went away already cancelled its future)."""
    if job.future.set_running_or_notify_cancel():
        job.future.set_exception(SchedulerStopped("the server is shutting down: the request was not run"))


def _answer(job: Job, row: int, text: str, tokens: list[int]) -> dict:
    """One generated row as the API returns it; finish_reason as OpenAI says it ("length" when the
    answer ran into max_new_tokens)."""
    prepared = job.prepared
    return {
        "text": text,
        "tokens": len(tokens),
        "prompt_tokens": prepared.prompt_tokens(row),
        "cut": prepared.encoded.cut[row],
        "finish_reason": "length" if len(tokens) >= job.config.max_new_tokens else "stop",
    }


def _stop_start(text: str, stop: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string: they are held
    back while streaming, since the final answer cuts a stop string once it is complete."""
    return max((k for marker in stop for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)
