"""The scheduler without HTTP: a decoding that never drains stays bounded and answers every job as
the bank answers it alone, and a stopped scheduler answers every job, queued or submitted late."""

from __future__ import annotations

import threading

import pytest

from softprompt.serve import scheduler as scheduling
from softprompt.serve.bank import TaskBank
from softprompt.serve.scheduler import Job, Scheduler
from softprompt.serve.telemetry import Telemetry

from helpers import write_run

SUMM = "{soft:4} Code: {input} Summary: {target}"
EXPLAIN = "Explain: {input} {soft:3} Answer: {target}"
SENTI = "{soft:3} Review: {text} Sentiment: {label}"
CODE = ["def add(a, b): return a + b", "print('hi')  # greet", "x = [i * i for i in range(10)]"]
WAIT_S = 60  # a bound on every wait, never reached when the scheduler works


@pytest.fixture(scope="module")
def bank(tmp_path_factory, tiny_backbone) -> TaskBank:
    root = tmp_path_factory.mktemp("runs")
    write_run(root / "summ", tiny_backbone, SUMM, seed=4, generation={"max_new_tokens": 8})
    write_run(root / "explain", tiny_backbone, EXPLAIN, seed=5, generation={"max_new_tokens": 6})
    write_run(root / "senti", tiny_backbone, SENTI, {"positive": ["code"], "negative": ["Sentiment"]})
    bank = TaskBank(tiny_backbone, allow=[root])
    for name in ("summ", "explain", "senti"):
        bank.load(name, root / name)
    return bank


def generation(bank: TaskBank, k: int, **config) -> Job:
    task = bank.get(("summ", "explain")[k % 2])
    return Job("generate", task, [{"input": CODE[k % len(CODE)]}], task.decode_config(**config))


def classification(bank: TaskBank) -> Job:
    return Job("classify", bank.get("senti"), [{"text": "a great film"}])


def spy_decodings(bank: TaskBank, monkeypatch, before_step=None) -> list:
    """Every decoding the bank starts, its `step` wrapped to call `before_step(decoding)` first."""
    decodings = []
    start = bank.start_decoding

    def spy(batch):
        decoding = start(batch)
        step = decoding.step

        def observed_step():
            if before_step is not None:
                before_step(decoding)
            return step()

        decoding.step = observed_step
        decodings.append(decoding)
        return decoding

    monkeypatch.setattr(bank, "start_decoding", spy)
    return decodings


def test_a_decoding_that_never_drains_keeps_its_rows_and_cache_bounded_and_answers_as_alone(bank, monkeypatch):
    """More generations than max_rows, all waiting at once: rows join as others finish, so one
    decoding runs the whole time (~150 steps), yet the rows it remembers and its key/value length stay
    bounded, and every answer is the one the bank gives that row alone."""
    sizes = []

    def measure(decoding):
        sizes.append((len(decoding.rows), decoding.context.cache.layers[0].keys.shape[2]))

    decodings = spy_decodings(bank, monkeypatch, measure)
    jobs = [generation(bank, k, max_new_tokens=2 + (5 * k) % 9) for k in range(60)]
    scheduler = Scheduler(bank, Telemetry(), window_ms=0, max_rows=4)
    for job in jobs:  # all queued before the worker starts: the order of joining is fixed
        scheduler.submit(job)
    scheduler.start()
    try:
        answers = [job.future.result(timeout=WAIT_S)[0]["text"] for job in jobs]
    finally:
        scheduler.stop()
    started = len(decodings)  # before the bank's own decodings below
    expected = [
        bank.generate([(job.task.name, job.inputs[0])], max_new_tokens=job.config.max_new_tokens)[0] for job in jobs
    ]
    assert answers == expected
    assert started == 1 and len(sizes) > 100  # it never drained
    prepared = [bank.prepare(job.task, job.inputs) for job in jobs]
    need = max(p.prompt_tokens(0) + job.config.max_new_tokens for p, job in zip(prepared, jobs))
    assert max(rows for rows, _ in sizes) <= 3 * 4
    assert max(width for _, width in sizes) <= 2 * need + 1


def test_a_job_submitted_after_stop_fails_at_once_with_scheduler_stopped(bank):
    scheduler = Scheduler(bank, Telemetry()).start()
    scheduler.stop()
    for job in (classification(bank), generation(bank, 0)):
        future = scheduler.submit(job)
        assert future.done()
        with pytest.raises(scheduling.SchedulerStopped):
            future.result(timeout=0)


def test_jobs_waiting_behind_a_busy_worker_fail_at_stop_without_waiting_for_it(bank, monkeypatch):
    """The worker is inside a classification batch; what waits behind it (a classification, a
    generation) fails with SchedulerStopped as soon as stop() is called, and the batch in hand is
    still answered."""
    entered, release = threading.Event(), threading.Event()
    classify = bank.classify_prepared

    def held(batch):
        entered.set()
        release.wait(WAIT_S)
        return classify(batch)

    monkeypatch.setattr(bank, "classify_prepared", held)
    scheduler = Scheduler(bank, Telemetry(), window_ms=0).start()
    stopper = threading.Thread(target=scheduler.stop)
    try:
        busy = classification(bank)
        scheduler.submit(busy)
        assert entered.wait(WAIT_S)
        waiting = [scheduler.submit(classification(bank)), scheduler.submit(generation(bank, 1))]
        stopper.start()
        for future in waiting:
            assert isinstance(future.exception(timeout=WAIT_S), scheduling.SchedulerStopped)
    finally:
        release.set()
        if stopper.ident is not None:
            stopper.join(WAIT_S)
        scheduler.stop()
    [probs] = busy.future.result(timeout=0)
    assert probs.shape == (2,)


def test_a_generation_decoding_at_stop_fails_with_scheduler_stopped(bank, monkeypatch):
    stepping, release = threading.Event(), threading.Event()

    def hold(_decoding):
        stepping.set()
        release.wait(WAIT_S)

    spy_decodings(bank, monkeypatch, hold)
    scheduler = Scheduler(bank, Telemetry(), window_ms=0).start()
    job = generation(bank, 0, max_new_tokens=500)
    stopper = threading.Thread(target=scheduler.stop)
    try:
        scheduler.submit(job)
        assert stepping.wait(WAIT_S)
        stopper.start()
        with scheduler.wake:  # stop() notifies once it has set the flag
            assert scheduler.wake.wait_for(lambda: scheduler.stopping, WAIT_S)
    finally:
        release.set()
        if stopper.ident is not None:
            stopper.join(WAIT_S)
    assert isinstance(job.future.exception(timeout=WAIT_S), scheduling.SchedulerStopped)


def test_stopping_a_scheduler_that_never_started_fails_its_queued_jobs(bank):
    scheduler = Scheduler(bank, Telemetry())
    future = scheduler.submit(classification(bank))
    scheduler.stop()
    assert isinstance(future.exception(timeout=0), scheduling.SchedulerStopped)


def test_a_cancelled_job_waiting_at_stop_stays_cancelled(bank):
    scheduler = Scheduler(bank, Telemetry())
    job = classification(bank)
    future = scheduler.submit(job)
    assert future.cancel()
    scheduler.stop()
    assert future.cancelled()
