"""The HTTP API (FastAPI): softprompt's own routes, the OpenAI completions shape, the web page.

The routes come in groups, one APIRouter each, over one `Service` (the bank, the scheduler, the
limits, and the steps every route shares): the task table, classify and generate, the OpenAI shape,
metrics, and the open routes (health check, page). Every API route but /healthz (and the page and
its static files, which hold no data) needs the bearer token when the server has one.

Errors answer {"error": {"message", "type", "code"}}, the shape the `openai` client reads, with 404
for an unknown task, 413 for too many rows, too long an input or too large a body, 422 for a
malformed request, 429 for a full queue, and 500 for a failure of the server's own: its message is
generic, with an id under which the server's log holds the details.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .bank import RUN_FILES, BankError, NotAllowed, ServedTask, TaskBank, TaskNotFound
from .scheduler import Job, QueueFull, Scheduler, SchedulerStopped
from .telemetry import Measured, Telemetry

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("softprompt.serve")
KINDS = {  # the error shape's `type` of each status
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    422: "invalid_request",
    429: "overloaded",
    500: "server_error",
    503: "unavailable",
}
STOPPING = "the server is shutting down: send the request again once it is back"


@dataclass
class Limits:
    """What one request may ask; beyond these the answer is a 4xx that says which limit."""

    max_rows: int = 64  # rows per request
    max_input_chars: int = 20_000  # characters per input field
    max_new_tokens: int = 512
    max_body_bytes: int = 8 * 2**20  # a request body: refused from its Content-Length, or as it arrives


class ClassifyRequest(BaseModel):
    task: str
    inputs: list[dict[str, str]] = Field(min_length=1)
    probabilities: bool = Field(
        True, description="false: each row's label only, found without scoring every label (faster with many labels)"
    )


class GenerateRequest(BaseModel):
    task: str
    inputs: list[dict[str, str]] = Field(min_length=1)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, description="0 or unset: greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's /v1/completions; fields this server does not use are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False


class LoadRequest(BaseModel):
    name: str
    path: str


def _error_body(status: int, message: str) -> dict:
    """{"error": {"message", "type", "code"}}: every error this server sends, JSON or stream event."""
    return {"error": {"message": message, "type": KINDS.get(status, "error"), "code": status}}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message), status_code=status, headers=headers)


def internal_error(err: BaseException) -> str:
    """The message a client gets for a failure of the server's own: an id and no details (a path or
    a tensor shape is no business of the caller); the server's log has the id with the exception."""
    error_id = uuid.uuid4().hex[:12]
    log.error("error id %s: the server failed on a request", error_id, exc_info=err)
    return f"the server failed on this request (error id {error_id}; the server's log has the details)"


def _sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before it is read in
    full: at once from its Content-Length, else (a chunked body) as soon as the bytes received pass
    the limit. The refusal closes the connection, so the rest of the body is never read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = Headers(scope=scope).get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_bytes):
            message = f"request body of {size} bytes; the limit is {self.max_bytes}"
            return await self._refuse(scope, receive, send, message)
        received, refused, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not started:
                    refused = True  # from here the app reads a client that left; its answer goes nowhere
                    await self._refuse(
                        scope, receive, send, f"request body past {received} bytes; the limit is {self.max_bytes}"
                    )
                    return {"type": "http.disconnect"}
            return message

        async def answer(message: Message) -> None:
            nonlocal started
            if not refused:
                started = started or message["type"] == "http.response.start"
                await send(message)

        await self.app(scope, counted, answer)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, message: str) -> None:
        await _error(413, message, headers={"connection": "close"})(scope, receive, send)


class Failures:
    """ASGI middleware: an exception no route handled answers 500 with a generic message (the log has
    the details) and the connection stays open, where Starlette's own handler would re-raise it and
    the server would then close the connection under a client that may reuse it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as err:
            if started or scope["type"] != "http":  # too late for an answer of our own
                raise
            await _error(500, internal_error(err))(scope, receive, send)


@dataclass
class Stream:
    """A streamed generation: its job, the job's future, and the text pieces as they are decoded."""

    job: Job
    future: Future
    pieces: asyncio.Queue  # (row, text piece)


@dataclass
class Service:
    """What the routes share: the bank, the scheduler, the limits, and the steps of answering."""

    bank: TaskBank
    scheduler: Scheduler
    limits: Limits

    @property
    def telemetry(self) -> Telemetry:
        return self.scheduler.telemetry

    def task(self, name: str, kind: str | None = None) -> ServedTask:
        try:
            task = self.bank.get(name)
        except TaskNotFound:
            raise HTTPException(404, f"no task named {name!r} is loaded; GET /v1/tasks lists them") from None
        if kind is not None and task.kind != kind:
            route = "/v1/classify" if task.kind == "classification" else "/v1/generate"
            raise HTTPException(422, f"task {name!r} is a {task.kind} task: use {route}")
        return task

    def check_inputs(self, task: ServedTask, inputs: list[dict[str, str]]) -> None:
        if len(inputs) > self.limits.max_rows:
            raise HTTPException(
                413, f"{len(inputs)} inputs in one request; the limit is {self.limits.max_rows}"
            )
        fields, most = task.model.template.fields, self.limits.max_input_chars
        for index, row in enumerate(inputs):
            missing = [f for f in fields if f not in row]
            if missing:
                raise HTTPException(
                    422, f"inputs[{index}] lacks field {missing[0]!r}; task {task.name!r} reads {fields}"
                )
            for name in fields:
                if len(row[name]) > most:
                    raise HTTPException(
                        413, f"inputs[{index}].{name} has {len(row[name])} characters; the limit is {most}"
                    )
            empty = next((name for name in fields if not row[name]), None)
            if empty is not None:
                try:  # a row the model cannot read would fail every request of its batch
                    task.model.encode([row])
                except ValueError as err:
                    raise HTTPException(422, f"inputs[{index}].{empty} is empty: {err}") from None

    def check_new_tokens(self, n: int | None) -> None:
        if n is not None and n > self.limits.max_new_tokens:
            raise HTTPException(
                422, f"max_new_tokens {n} is above this server's limit of {self.limits.max_new_tokens}"
            )

    def submit(self, job: Job) -> Future:
        try:
            future = self.scheduler.submit(job)
        except QueueFull as err:
            raise HTTPException(429, str(err)) from None
        if future.done() and not future.cancelled() and isinstance(future.exception(), SchedulerStopped):
            raise HTTPException(503, STOPPING)  # before a stream's 200 is sent
        return future

    async def run(self, job: Job):
        future = self.submit(job)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        except SchedulerStopped:
            raise HTTPException(503, STOPPING) from None
        except Exception as err:  # noqa: BLE001 - the batch failed: answer this request, keep the server
            raise HTTPException(500, internal_error(err)) from err

    def count(self, task: ServedTask, rows: int) -> None:
        self.telemetry.rows.labels(task.name, task.kind).inc(rows)

    def count_tasks(self) -> None:
        self.telemetry.tasks_loaded.set(len(self.bank.tasks))

    async def classify_rows(self, task: ServedTask, inputs: list[dict[str, str]], probabilities: bool = True) -> list[dict]:
        """Each row's label, with every label's probability (the whole label trie scored) or without
        (the pruned search: the same label, fewer label tokens fed)."""
        self.check_inputs(task, inputs)
        job = Job("classify", task, inputs, answer_only=not probabilities)
        results = await self.run(job)
        self.count(task, len(inputs))
        labels = task.labels or []
        out = []
        for i, result in enumerate(results):
            row: dict = {"label": labels[int(result.argmax()) if probabilities else result]}
            if probabilities:
                row["probabilities"] = {label: round(float(v), 6) for label, v in zip(labels, result)}
            out.append({**row, "prompt_tokens": job.prepared.prompt_tokens(i), "cut": job.prepared.encoded.cut[i]})
        return out

    def generation_job(
        self,
        task: ServedTask,
        inputs: list[dict[str, str]],
        *,
        max_new_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        stop: list[str] | None = None,
        on_token: Callable[[int, str], None] | None = None,
    ) -> Job:
        self.check_inputs(task, inputs)
        self.check_new_tokens(max_new_tokens)
        sample = temperature is not None and temperature > 0
        config = task.decode_config(
            max_new_tokens=max_new_tokens,
            do_sample=sample or None,
            temperature=temperature if sample else None,
            top_p=top_p,
            stop=stop,
        )
        config.max_new_tokens = min(config.max_new_tokens, self.limits.max_new_tokens)
        return Job("generate", task, inputs, config, on_token)

    async def generate_rows(self, task: ServedTask, inputs: list[dict[str, str]], **options) -> list[dict]:
        """Each row's answer, not streamed; `options` as `generation_job` takes them."""
        results = await self.run(self.generation_job(task, inputs, **options))
        self.count(task, len(inputs))
        return results

    def streaming_job(self, task: ServedTask, inputs: list[dict[str, str]], **options) -> Stream:
        """A generation submitted now (so a full queue still answers 429), its pieces queued as decoded."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def on_token(row: int, piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, (row, piece))

        job = self.generation_job(task, inputs, **options, on_token=on_token)
        return Stream(job, self.submit(job), pieces)

    async def events(
        self, stream: Stream, shape: Callable[[tuple | None, list | None], str]
    ) -> AsyncIterator[str]:
        """Server-sent events: `shape(piece, None)` for each text piece as it is decoded, then
        `shape(None, results)`, then [DONE]; a failure is an error event."""
        waiter = asyncio.ensure_future(asyncio.wrap_future(stream.future))
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(stream.pieces.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield shape(getter.result(), None)
                    continue
                getter.cancel()
                while not stream.pieces.empty():
                    yield shape(stream.pieces.get_nowait(), None)
                try:
                    results = waiter.result()
                except SchedulerStopped:
                    yield _sse(_error_body(503, STOPPING))
                    return
                except Exception as err:  # noqa: BLE001 - tell the client, keep the server
                    yield _sse(_error_body(500, internal_error(err)))
                    return
                self.count(stream.job.task, stream.job.rows)
                yield shape(None, results)
                yield _sse("[DONE]")
                return
        finally:
            stream.job.cancelled = True  # a no-op when finished; stops the decoding when the client left
            waiter.cancel()
            if getter is not None:
                getter.cancel()


def task_routes(service: Service) -> APIRouter:
    """The task table: list, load, unload, and a task's figures."""
    routes, bank = APIRouter(), service.bank

    @routes.get("/v1/tasks")
    async def list_tasks() -> dict:
        tasks = [t.describe() for t in bank.tasks.values()]
        return {"model": bank.backbone.spec, "fingerprint": bank.backbone.fingerprint, "tasks": tasks}

    @routes.post("/v1/tasks", status_code=201)
    async def load_task(request: LoadRequest) -> dict:
        try:
            task = await asyncio.to_thread(bank.load, request.name, request.path)
        except NotAllowed as err:
            raise HTTPException(403, str(err)) from None
        except BankError as err:
            raise HTTPException(422, str(err)) from None
        service.count_tasks()
        return task.describe()

    @routes.delete("/v1/tasks/{name}")
    async def unload_task(name: str) -> dict:
        try:
            bank.unload(name)
        except TaskNotFound:
            raise HTTPException(404, f"no task named {name!r} is loaded") from None
        service.count_tasks()
        return {"unloaded": name}

    @routes.get("/v1/tasks/{name}/files/{file}")
    async def task_file(name: str, file: str) -> FileResponse:
        task = service.task(name)
        if file not in RUN_FILES or not (task.path / file).is_file():
            raise HTTPException(404, f"task {name!r} has no file {file!r}; files: {task.describe()['files']}")
        return FileResponse(task.path / file)

    return routes


def answer_routes(service: Service) -> APIRouter:
    """softprompt's own answers: /v1/classify and /v1/generate (plain or streamed)."""
    routes = APIRouter()

    @routes.post("/v1/classify")
    async def classify(request: ClassifyRequest) -> dict:
        task = service.task(request.task, "classification")
        return {"task": task.name, "results": await service.classify_rows(task, request.inputs, request.probabilities)}

    @routes.post("/v1/generate")
    async def generate(request: GenerateRequest):
        task = service.task(request.task, "generation")
        options = dict(
            max_new_tokens=request.max_new_tokens, temperature=request.temperature, top_p=request.top_p
        )
        if not request.stream:
            return {
                "task": task.name,
                "results": await service.generate_rows(task, request.inputs, **options),
            }

        def shape(piece: tuple | None, results: list | None) -> str:
            if results is not None:
                return _sse({"done": True, "task": task.name, "results": results})
            return _sse({"index": piece[0], "text": piece[1]})

        stream = service.streaming_job(task, request.inputs, **options)
        return StreamingResponse(service.events(stream, shape), media_type="text/event-stream")

    return routes


def openai_routes(service: Service) -> APIRouter:
    """OpenAI's shape: the tasks as models, and /v1/completions over a task of one input field."""
    routes = APIRouter()

    @routes.get("/v1/models")
    async def models() -> dict:
        tasks = service.bank.tasks.values()
        return {
            "object": "list",
            "data": [
                {"id": t.name, "object": "model", "created": 0, "owned_by": "softprompt", "kind": t.kind}
                for t in tasks
            ],
        }

    @routes.post("/v1/completions")
    async def completions(request: CompletionRequest):
        task = service.task(request.model)
        fields = task.model.template.fields
        if len(fields) != 1:
            raise HTTPException(
                422,
                f"task {task.name!r} reads fields {fields}; prompt fills one field: use /v1/classify or /v1/generate",
            )
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:  # no rows: a job without rows would fail (or hang) the batch it joins
            raise HTTPException(422, "prompt: an empty list; give a string or a list of strings")
        inputs = [{fields[0]: p} for p in prompts]
        base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": task.name,
            "object": "text_completion",
        }
        if task.kind == "classification":
            return await _complete_labels(service, task, inputs, base=base, stream=request.stream)
        return await _complete_texts(service, task, inputs, base=base, request=request)

    return routes


def _choice(index: int, text: str, reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": reason}


async def _complete_labels(
    service: Service, task: ServedTask, inputs: list[dict], *, base: dict, stream: bool
):
    """A classification task's completion: each prompt's label; streamed, one chunk and the end marker."""
    results = await service.classify_rows(task, inputs, probabilities=False)  # the label is all it answers
    choices = [_choice(i, r["label"], "stop") for i, r in enumerate(results)]
    if stream:
        return StreamingResponse(
            iter([_sse({**base, "choices": choices}), _sse("[DONE]")]), media_type="text/event-stream"
        )
    return {
        **base,
        "choices": choices,
        "usage": _usage(sum(r["prompt_tokens"] for r in results), len(results)),
    }


async def _complete_texts(
    service: Service, task: ServedTask, inputs: list[dict], *, base: dict, request: CompletionRequest
):
    """A generation task's completion: each prompt's text, plain or streamed piece by piece."""
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    options = dict(
        max_new_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p, stop=stop
    )
    if not request.stream:
        results = await service.generate_rows(task, inputs, **options)
        choices = [_choice(i, r["text"], r["finish_reason"]) for i, r in enumerate(results)]
        usage = _usage(sum(r["prompt_tokens"] for r in results), sum(r["tokens"] for r in results))
        return {**base, "choices": choices, "usage": usage}

    def shape(piece: tuple | None, results: list | None) -> str:
        if results is not None:
            return _sse(
                {**base, "choices": [_choice(i, "", r["finish_reason"]) for i, r in enumerate(results)]}
            )
        return _sse({**base, "choices": [_choice(piece[0], piece[1], None)]})

    stream = service.streaming_job(task, inputs, **options)
    return StreamingResponse(service.events(stream, shape), media_type="text/event-stream")


def metrics_routes(service: Service) -> APIRouter:
    """Prometheus metrics, the prefix cache's counts read at each scrape."""
    routes = APIRouter()

    @routes.get("/metrics")
    async def metrics() -> Response:
        cache, telemetry = service.bank.cache, service.telemetry
        telemetry.cache_hits.set(cache.hits)
        telemetry.cache_misses.set(cache.misses)
        telemetry.cache_bytes.set(cache.bytes)
        service.count_tasks()
        return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    return routes


def open_routes(service: Service) -> APIRouter:
    """What needs no token: the health check and the page."""
    routes = APIRouter()

    @routes.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "tasks": len(service.bank.tasks), "model": service.bank.backbone.spec}

    @routes.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return routes


def bearer_guard(token: str | None) -> list:
    """The dependency every guarded route carries: the bearer token, when the server has one."""

    def authorized(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")

    return [Depends(authorized)]


def answer_errors_in_shape(app: FastAPI) -> None:
    """Every error a route raises in the {"error": ...} shape (a failure: `Failures`)."""

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and the router's 404/405
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return _error(422, problems)


def create_app(
    bank: TaskBank, scheduler: Scheduler, *, limits: Limits | None = None, token: str | None = None
) -> FastAPI:
    service = Service(bank, scheduler, limits or Limits())
    # With a token the API schema is not published (/docs, /openapi.json): every other route is guarded.
    published = token is None
    app = FastAPI(
        title="softprompt",
        docs_url="/docs" if published else None,
        redoc_url=None,
        openapi_url="/openapi.json" if published else None,
    )
    app.state.bank, app.state.scheduler = bank, scheduler
    answer_errors_in_shape(app)
    # the last added runs first: Measured counts every answer, refusals and failures included
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_body_bytes)
    app.add_middleware(Failures)
    app.add_middleware(Measured, telemetry=service.telemetry)
    guarded = (task_routes, answer_routes, openai_routes, metrics_routes)
    for routes in guarded:
        app.include_router(routes(service), dependencies=bearer_guard(token))
    app.include_router(open_routes(service))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
