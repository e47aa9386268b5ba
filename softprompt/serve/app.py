"""The HTTP API (FastAPI): softprompt's own routes, the OpenAI completions shape, the web page.

Every API route but /healthz (and the page's static files, which hold no data) needs the bearer
token when the server has one. Errors answer {"error": {"message", "type", "code"}}, the shape the
`openai` client reads, with 404 for an unknown task, 413 for too many rows or too long an input,
422 for a malformed request, 429 for a full queue.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .bank import RUN_FILES, BankError, NotAllowed, ServedTask, TaskBank, TaskNotFound
from .scheduler import Job, QueueFull, Scheduler
from .telemetry import Telemetry

STATIC = Path(__file__).parent / "static"


@dataclass
class Limits:
    """What one request may ask; beyond these the answer is a 4xx that says which limit."""

    max_rows: int = 64  # rows per request
    max_input_chars: int = 20_000  # characters per input field
    max_new_tokens: int = 512
    max_body_bytes: int = 8 * 2**20  # a request body, refused from its Content-Length before it is read


class ClassifyRequest(BaseModel):
    task: str
    inputs: list[dict[str, str]] = Field(min_length=1)


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


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(bank: TaskBank, scheduler: Scheduler, limits: Limits | None = None, token: str | None = None) -> FastAPI:
    limits = limits or Limits()
    telemetry: Telemetry = scheduler.telemetry
    # With a token the API schema is not published (/docs, /openapi.json): every other route is guarded.
    published = token is None
    app = FastAPI(
        title="softprompt", docs_url="/docs" if published else None, redoc_url=None,
        openapi_url="/openapi.json" if published else None,
    )
    app.state.bank, app.state.scheduler = bank, scheduler

    def authorized(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")

    guard = [Depends(authorized)]

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and the router's 404/405
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kinds = {
            500: "server_error",
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
            413: "too_large",
            422: "invalid_request",
            429: "overloaded",
        }
        return _error(err.status_code, str(err.detail), kinds.get(err.status_code, "error"))

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:
        return _error(500, f"the server failed on this request: {err}", "server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return _error(422, problems, "invalid_request")

    @app.middleware("http")
    async def measure(request: Request, call_next):
        start = time.perf_counter()
        size = request.headers.get("content-length", "0")
        if not size.isdigit() or int(size) > limits.max_body_bytes:
            response = _error(413, f"request body of {size} bytes; the limit is {limits.max_body_bytes}", "too_large")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "other")
        telemetry.requests.labels(name, str(response.status_code)).inc()
        telemetry.latency.labels(name).observe(time.perf_counter() - start)
        return response

    # -- helpers ---------------------------------------------------------------------------------
    def task_of(name: str, kind: str | None = None) -> ServedTask:
        try:
            task = bank.get(name)
        except TaskNotFound:
            raise HTTPException(404, f"no task named {name!r} is loaded; GET /v1/tasks lists them") from None
        if kind is not None and task.kind != kind:
            route = "/v1/classify" if task.kind == "classification" else "/v1/generate"
            raise HTTPException(422, f"task {name!r} is a {task.kind} task: use {route}")
        return task

    def check_inputs(task: ServedTask, inputs: list[dict[str, str]]) -> None:
        if len(inputs) > limits.max_rows:
            raise HTTPException(413, f"{len(inputs)} inputs in one request; the limit is {limits.max_rows}")
        fields = task.model.template.fields
        for index, row in enumerate(inputs):
            missing = [f for f in fields if f not in row]
            if missing:
                raise HTTPException(422, f"inputs[{index}] lacks field {missing[0]!r}; task {task.name!r} reads {fields}")
            for name in fields:
                if len(row[name]) > limits.max_input_chars:
                    raise HTTPException(
                        413, f"inputs[{index}].{name} has {len(row[name])} characters; the limit is {limits.max_input_chars}"
                    )

    def check_new_tokens(n: int | None) -> None:
        if n is not None and n > limits.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens {n} is above this server's limit of {limits.max_new_tokens}")

    def submit(job: Job):
        try:
            return scheduler.submit(job)
        except QueueFull as err:
            raise HTTPException(429, str(err)) from None

    async def run(job: Job):
        future = submit(job)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        except Exception as err:  # noqa: BLE001 - the batch failed: answer this request, keep the server
            raise HTTPException(500, f"the server failed on this request: {err}") from err

    def count(task: ServedTask, rows: int) -> None:
        telemetry.rows.labels(task.name, task.kind).inc(rows)

    async def classify_rows(task: ServedTask, inputs: list[dict[str, str]]) -> list[dict]:
        check_inputs(task, inputs)
        job = Job("classify", task, inputs)
        probs = await run(job)
        count(task, len(inputs))
        labels = task.labels or []
        return [
            {
                "label": labels[int(p.argmax())],
                "probabilities": {label: round(float(v), 6) for label, v in zip(labels, p)},
                "prompt_tokens": job.prepared.prompt_tokens(i),
                "cut": job.prepared.encoded.cut[i],
            }
            for i, p in enumerate(probs)
        ]

    def generation_job(task: ServedTask, inputs, max_new_tokens, temperature, top_p, stop=None, on_token=None) -> Job:
        check_inputs(task, inputs)
        check_new_tokens(max_new_tokens)
        sample = temperature is not None and temperature > 0
        config = task.decode_config(
            max_new_tokens=max_new_tokens,
            do_sample=sample or None,
            temperature=temperature if sample else None,
            top_p=top_p,
            stop=stop,
        )
        config.max_new_tokens = min(config.max_new_tokens, limits.max_new_tokens)
        return Job("generate", task, inputs, config, on_token)

    async def stream(job: Job, future, events: asyncio.Queue, shape) -> AsyncIterator[str]:
        """Server-sent events: each text piece as it is decoded, then the results, then [DONE]. The
        job is submitted before the response starts, so a full queue still answers 429."""
        waiter = asyncio.ensure_future(asyncio.wrap_future(future))
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield shape(getter.result(), None)
                    continue
                getter.cancel()
                while not events.empty():
                    yield shape(events.get_nowait(), None)
                try:
                    results = waiter.result()
                except Exception as err:  # noqa: BLE001 - tell the client, keep the server
                    yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error', 'code': 500}})}\n\n"
                    return
                count(job.task, job.rows)
                yield shape(None, results)
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancelled = True  # a no-op when finished; stops the decoding when the client left
            waiter.cancel()
            if getter is not None:
                getter.cancel()

    def streaming_job(task, inputs, max_new_tokens, temperature, top_p, stop=None):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(row: int, piece: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (row, piece))

        job = generation_job(task, inputs, max_new_tokens, temperature, top_p, stop, on_token)
        return job, submit(job), events

    # -- softprompt's routes ---------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "tasks": len(bank.tasks), "model": bank.backbone.spec}

    @app.get("/v1/tasks", dependencies=guard)
    async def list_tasks() -> dict:
        return {"model": bank.backbone.spec, "fingerprint": bank.backbone.fingerprint, "tasks": [t.describe() for t in bank.tasks.values()]}

    @app.post("/v1/tasks", dependencies=guard, status_code=201)
    async def load_task(request: LoadRequest) -> dict:
        try:
            task = await asyncio.to_thread(bank.load, request.name, request.path)
        except NotAllowed as err:
            raise HTTPException(403, str(err)) from None
        except BankError as err:
            raise HTTPException(422, str(err)) from None
        telemetry.tasks_loaded.set(len(bank.tasks))
        return task.describe()

    @app.delete("/v1/tasks/{name}", dependencies=guard)
    async def unload_task(name: str) -> dict:
        try:
            bank.unload(name)
        except TaskNotFound:
            raise HTTPException(404, f"no task named {name!r} is loaded") from None
        telemetry.tasks_loaded.set(len(bank.tasks))
        return {"unloaded": name}

    @app.get("/v1/tasks/{name}/files/{file}", dependencies=guard)
    async def task_file(name: str, file: str) -> FileResponse:
        task = task_of(name)
        if file not in RUN_FILES or not (task.path / file).is_file():
            raise HTTPException(404, f"task {name!r} has no file {file!r}; files: {task.describe()['files']}")
        return FileResponse(task.path / file)

    @app.post("/v1/classify", dependencies=guard)
    async def classify(request: ClassifyRequest) -> dict:
        task = task_of(request.task, "classification")
        return {"task": task.name, "results": await classify_rows(task, request.inputs)}

    @app.post("/v1/generate", dependencies=guard)
    async def generate(request: GenerateRequest):
        task = task_of(request.task, "generation")
        args = (task, request.inputs, request.max_new_tokens, request.temperature, request.top_p)
        if not request.stream:
            job = generation_job(*args)
            results = await run(job)
            count(task, len(request.inputs))
            return {"task": task.name, "results": results}
        job, future, events = streaming_job(*args)

        def shape(event, results) -> str:
            if results is not None:
                return f"data: {json.dumps({'done': True, 'task': task.name, 'results': results})}\n\n"
            row, piece = event
            return f"data: {json.dumps({'index': row, 'text': piece})}\n\n"

        return StreamingResponse(stream(job, future, events, shape), media_type="text/event-stream")

    # -- the OpenAI shape ------------------------------------------------------------------------
    @app.get("/v1/models", dependencies=guard)
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": t.name, "object": "model", "created": 0, "owned_by": "softprompt", "kind": t.kind} for t in bank.tasks.values()],
        }

    @app.post("/v1/completions", dependencies=guard)
    async def completions(request: CompletionRequest):
        task = task_of(request.model)
        fields = task.model.template.fields
        if len(fields) != 1:
            raise HTTPException(422, f"task {task.name!r} reads fields {fields}; prompt fills one field: use /v1/classify or /v1/generate")
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:  # no rows: a job without rows would fail (or hang) the batch it joins
            raise HTTPException(422, "prompt: an empty list; give a string or a list of strings")
        inputs = [{fields[0]: p} for p in prompts]
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": task.name}

        def choice(index: int, text: str, reason: str | None) -> dict:
            return {"text": text, "index": index, "logprobs": None, "finish_reason": reason}

        if task.kind == "classification":
            results = await classify_rows(task, inputs)
            choices = [choice(i, r["label"], "stop") for i, r in enumerate(results)]
            usage = sum(r["prompt_tokens"] for r in results)
            if request.stream:
                return StreamingResponse(_one_shot_stream(base, choices), media_type="text/event-stream")
            return {**base, "object": "text_completion", "choices": choices, "usage": _usage(usage, len(results))}
        args = (task, inputs, request.max_tokens, request.temperature, request.top_p, stop)
        if not request.stream:
            job = generation_job(*args)
            results = await run(job)
            count(task, len(inputs))
            choices = [choice(i, r["text"], r["finish_reason"]) for i, r in enumerate(results)]
            used = sum(r["tokens"] for r in results)
            return {**base, "object": "text_completion", "choices": choices, "usage": _usage(sum(r["prompt_tokens"] for r in results), used)}
        job, future, events = streaming_job(*args)

        def shape(event, results) -> str:
            if results is not None:
                chunk = [choice(i, "", r["finish_reason"]) for i, r in enumerate(results)]
            else:
                chunk = [choice(event[0], event[1], None)]
            return f"data: {json.dumps({**base, 'object': 'text_completion', 'choices': chunk})}\n\n"

        return StreamingResponse(stream(job, future, events, shape), media_type="text/event-stream")

    # -- operations and the page -----------------------------------------------------------------
    @app.get("/metrics", dependencies=guard)
    async def metrics() -> Response:
        cache = bank.cache
        telemetry.cache_hits.set(cache.hits)
        telemetry.cache_misses.set(cache.misses)
        telemetry.cache_bytes.set(cache.bytes)
        telemetry.tasks_loaded.set(len(bank.tasks))
        return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


async def _one_shot_stream(base: dict, choices: list[dict]) -> AsyncIterator[str]:
    """A classification answers at once; streamed, it is one chunk and the end marker."""
    yield f"data: {json.dumps({**base, 'object': 'text_completion', 'choices': choices})}\n\n"
    yield "data: [DONE]\n\n"
