"""A real server for the tests: uvicorn on a free loopback port, in a thread of the test process,
over a bank of runs on a tiny model."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import uvicorn

from softprompt.serve.app import Limits, create_app
from softprompt.serve.bank import TaskBank
from softprompt.serve.scheduler import Scheduler
from softprompt.serve.telemetry import Telemetry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(bank: TaskBank, token: str | None = None, limits: Limits | None = None, **scheduling):
    """Yields the base URL (http://127.0.0.1:PORT) of a started server; stops it afterwards."""
    scheduler = Scheduler(bank, Telemetry(), **scheduling).start()
    port = free_port()
    config = uvicorn.Config(create_app(bank, scheduler, limits=limits, token=token), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        scheduler.stop()
