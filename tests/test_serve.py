"""The server (softprompt.serve) over HTTP: a real uvicorn server on 127.0.0.1 in a thread, a bank of
runs on the tiny model, httpx and the official `openai` client as the callers. What a request answers
must equal what the bank answers directly; limits, errors, auth and run-time loading answer as the
API promises; concurrency (mixed-task batches, unloading mid-flight, clients that leave) never takes
the server down."""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file
from serving import running_server

from softprompt.run import RunInfo
from softprompt.serve.app import Limits, create_app
from softprompt.serve.bank import ServedTask, TaskBank, TaskNotFound
from softprompt.serve.scheduler import Scheduler
from softprompt.serve.telemetry import Telemetry

from helpers import write_run

SENTI = "{soft:3} Review: {text} Sentiment: {label}"
SENTI_WORDS = {"positive": ["code"], "negative": ["Sentiment"]}
MULTI = "{soft:5} Read the review and say how the writer felt. Review: {text} Feeling: {label}"
MULTI_WORDS = {"pos": ["great film", "positive"], "neg": ["dull mess"], "meh": ["ok"]}
SUMM = "{soft:4} Code: {input} Summary: {target}"
EXPLAIN = "Explain: {input} {soft:3} Answer: {target}"

TEXTS = ["a great film", "a dull, boring mess", "ok", "lovely and moving"]
CODE = ["def add(a, b): return a + b", "print('hi')  # greet"]
LIMITS = Limits(max_rows=8, max_input_chars=200, max_new_tokens=2000)
TOKEN = "s3cret"
SAMPLED = {
    "temperature": 3.0
}  # the tiny model's greedy answer is one token repeated: sampling varies the text


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_backbone) -> Path:
    """The one root the servers may load from, holding the runs the tests serve."""
    root = tmp_path_factory.mktemp("runs")
    write_run(root / "senti", tiny_backbone, SENTI, SENTI_WORDS)
    write_run(root / "senti2", tiny_backbone, SENTI, SENTI_WORDS, seed=1)
    write_run(root / "senti3", tiny_backbone, SENTI, SENTI_WORDS, seed=2)
    write_run(root / "multi", tiny_backbone, MULTI, MULTI_WORDS, seed=3)
    write_run(root / "summ", tiny_backbone, SUMM, seed=4, generation={"max_new_tokens": 8})
    write_run(root / "explain", tiny_backbone, EXPLAIN, seed=5, generation={"max_new_tokens": 6})
    write_run(root / "beams", tiny_backbone, SUMM, seed=6, generation={"max_new_tokens": 6, "num_beams": 2})
    return root


SERVED = ("senti", "senti2", "senti3", "multi", "summ", "explain", "beams")


def make_bank(backbone, runs: Path, cache_mb: float = 64, names=SERVED) -> TaskBank:
    bank = TaskBank(backbone, cache_mb=cache_mb, allow=[runs])
    for name in names:
        bank.load(name, runs / name)
    return bank


@pytest.fixture(scope="module")
def bank(tiny_backbone, runs) -> TaskBank:
    return make_bank(tiny_backbone, runs)


@pytest.fixture(scope="module")
def url(bank):
    with running_server(bank, limits=LIMITS) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def oai(url) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)


# -- helpers --------------------------------------------------------------------------------------
def error(response: httpx.Response, status: int) -> str:
    """Assert the status and the {"error": {"message", "type", "code"}} shape; the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    assert body["error"]["code"] == status and body["error"]["message"], body
    return body["error"]["message"]


def events(response: httpx.Response) -> list:
    """The server-sent events of a streamed answer: parsed JSON, or the string "[DONE]"."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def samples(client: httpx.Client, name: str) -> dict:
    """The samples of one Prometheus metric family from /metrics: {(sample name, labels): value}."""
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    raise AssertionError(f"no metric {name} in /metrics")


def queue_rows(client: httpx.Client) -> float:
    return samples(client, "softprompt_queue_rows")[("softprompt_queue_rows", ())]


def wait_until(condition, what: str, timeout: float = 15) -> None:
    """Poll `condition` until it holds; fail, saying what was awaited, past the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def rows(texts, field="text") -> list[dict]:
    return [{field: t} for t in texts]


def assert_same_classes(results: list[dict], expected: list[dict]) -> None:
    assert [r["label"] for r in results] == [e["label"] for e in expected]
    for got, want in zip(results, expected):
        assert got["probabilities"].keys() == want["probabilities"].keys()
        for label, p in want["probabilities"].items():
            assert got["probabilities"][label] == pytest.approx(p, abs=1e-5)


def classify(client, task: str, texts) -> httpx.Response:
    return client.post("/v1/classify", json={"task": task, "inputs": rows(texts)})


def generate(client, task: str, codes, **options) -> httpx.Response:
    return client.post("/v1/generate", json={"task": task, "inputs": rows(codes, "input"), **options})


def direct_classes(bank: TaskBank, task: str, texts) -> list[dict]:
    return bank.classify([(task, {"text": t}) for t in texts])


def direct_texts(bank: TaskBank, task: str, codes, **overrides) -> list[str]:
    return bank.generate([(task, {"input": c}) for c in codes], **overrides)


def copy_run(runs: Path, source: str, name: str) -> Path:
    target = runs / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(runs / source, target)
    return target


def load(client, name: str, path) -> httpx.Response:
    return client.post("/v1/tasks", json={"name": name, "path": str(path)})


# -- 1. answers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["senti", "multi"])
def test_classify_answers_each_input_with_the_label_and_probabilities_of_the_bank(client, bank, task):
    response = classify(client, task, TEXTS)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == task and len(body["results"]) == len(TEXTS)
    assert_same_classes(body["results"], direct_classes(bank, task, TEXTS))
    for result in body["results"]:
        assert math.isclose(sum(result["probabilities"].values()), 1, abs_tol=1e-5)
        assert result["prompt_tokens"] > 0 and result["cut"] == 0


@pytest.mark.parametrize(
    "options", [{}, {"max_new_tokens": 12}, SAMPLED], ids=["greedy", "longer", "sampled"]
)
def test_generate_answers_the_same_text_as_the_bank(client, bank, options):
    response = generate(client, "summ", CODE, **options)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    overrides = {k: v for k, v in options.items() if k != "temperature"}
    if "temperature" in options:
        overrides.update(do_sample=True, temperature=options["temperature"])
    assert [r["text"] for r in results] == direct_texts(bank, "summ", CODE, **overrides)
    budget = options.get("max_new_tokens", 8)
    assert all(0 < r["tokens"] <= budget for r in results)


def test_concurrent_requests_of_different_tasks_share_a_batch_and_answer_as_alone(tiny_backbone, runs):
    """Rows of 3 classification tasks (and of 2 generation tasks) are gathered into one batch each
    (the window only closes when every row has arrived), and each answer equals its task's alone."""
    bank = make_bank(tiny_backbone, runs)
    classify_tasks, generate_tasks = ["senti", "senti2", "multi"], ["summ", "explain"]
    expected = {t: direct_classes(bank, t, TEXTS[:2]) for t in classify_tasks}
    expected.update({t: direct_texts(bank, t, CODE) for t in generate_tasks})
    total = 2 * (len(classify_tasks) + len(generate_tasks))
    with running_server(bank, window_ms=20_000, max_rows=total) as base:

        def ask(task):
            if task in classify_tasks:
                return task, httpx.post(
                    f"{base}/v1/classify", json={"task": task, "inputs": rows(TEXTS[:2])}, timeout=60
                )
            return task, httpx.post(
                f"{base}/v1/generate", json={"task": task, "inputs": rows(CODE, "input")}, timeout=60
            )

        with ThreadPoolExecutor(len(expected)) as pool:
            answers = dict(pool.map(ask, expected))
        for task, response in answers.items():
            assert response.status_code == 200, response.text
            if task in classify_tasks:
                assert_same_classes(response.json()["results"], expected[task])
            else:
                assert [r["text"] for r in response.json()["results"]] == expected[task]
        with httpx.Client(base_url=base) as c:
            batch_tasks = samples(c, "softprompt_batch_tasks")
    bucket = {dict(labels)["le"]: v for (name, labels), v in batch_tasks.items() if name.endswith("_bucket")}
    assert bucket["1.0"] < batch_tasks[("softprompt_batch_tasks_count", ())]  # some batch held > 1 task
    assert bucket["2.0"] < bucket["3.0"]  # the classification batch held all 3 tasks


def test_an_empty_input_right_before_the_slot_is_read_at_the_text_before_it(client, bank, runs):
    """With text "", 'Review:{text} {label}' is 'Review: {label}': the row has no token of its own,
    so its label is read at the prefix's last token, as in a template whose slot precedes its field;
    the row next to it answers as alone."""
    words = SENTI_WORDS
    bank.load(
        "bare", write_run(runs / "bare", bank.backbone, "{soft:3} Review:{text} {label}", words, seed=41)
    )
    bank.load(
        "bare-same",
        write_run(runs / "bare-same", bank.backbone, "{soft:3} Review: {label}{text}", words, seed=41),
    )
    try:
        response = classify(client, "bare", ["", TEXTS[0]])
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert_same_classes(results[:1], direct_classes(bank, "bare-same", [""]))
        assert_same_classes(results[1:], direct_classes(bank, "bare", TEXTS[:1]))
    finally:
        bank.unload("bare")
        bank.unload("bare-same")


def test_an_empty_input_with_nothing_before_it_is_422_naming_it(client, bank, runs):
    """'{text} {label}' without soft tokens, on a model without a BOS token: an empty text leaves the
    model nothing to read the label from."""
    run = write_run(runs / "nothing-before", bank.backbone, "{soft:1}{text} {label}", SENTI_WORDS)
    info = RunInfo.read(run)
    info.method, info.template, info.soft_tokens = "zero-shot", "{text} {label}", 0
    info.write(run)
    (run / "prompt.safetensors").unlink()
    bank.load("nothing-before", run)
    try:
        assert "inputs[1].text" in error(classify(client, "nothing-before", ["ok", ""]), 422)
        assert classify(client, "nothing-before", ["ok"]).status_code == 200
    finally:
        bank.unload("nothing-before")


# -- 2. streaming ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options", [{"max_new_tokens": 10}, {"max_new_tokens": 24, **SAMPLED}], ids=["greedy", "sampled"]
)
def test_streamed_pieces_join_to_the_final_text_and_the_plain_answer(client, options):
    with client.stream(
        "POST",
        "/v1/generate",
        json={"task": "summ", "inputs": rows(CODE, "input"), "stream": True, **options},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        sent = events(r)
    assert sent[-1] == "[DONE]"
    final = sent[-2]
    assert final["done"] is True and final["task"] == "summ"
    pieces = sent[:-2]
    assert pieces and all(set(p) == {"index", "text"} for p in pieces)
    joined = ["".join(p["text"] for p in pieces if p["index"] == i) for i in range(len(CODE))]
    plain = generate(client, "summ", CODE, **options).json()["results"]
    assert joined == [r["text"] for r in final["results"]] == [r["text"] for r in plain]
    assert all(joined)


# -- 3. the openai client -------------------------------------------------------------------------
def test_openai_client_lists_the_tasks_as_models(oai, bank):
    assert sorted(m.id for m in oai.models.list()) == sorted(bank.tasks)


def test_openai_completion_answers_the_text_of_generate(oai, client):
    completion = oai.completions.create(model="summ", prompt=CODE[0], max_tokens=5)
    expected = generate(client, "summ", CODE[:1], max_new_tokens=5).json()["results"][0]
    assert completion.choices[0].text == expected["text"]
    assert completion.choices[0].finish_reason == expected["finish_reason"] == "length"
    assert completion.usage.completion_tokens == 5


def test_openai_streamed_completion_chunks_join_to_the_text_of_generate(oai, client):
    stream = oai.completions.create(model="summ", prompt=CODE[1], max_tokens=20, temperature=3.0, stream=True)
    joined = "".join(chunk.choices[0].text for chunk in stream)
    expected = generate(client, "summ", CODE[1:], max_new_tokens=20, **SAMPLED).json()["results"][0]["text"]
    assert joined == expected and joined


def test_openai_completion_of_a_classification_task_answers_its_label(oai, bank):
    completion = oai.completions.create(model="multi", prompt=[TEXTS[0], TEXTS[1]])
    assert [c.text for c in completion.choices] == [
        e["label"] for e in direct_classes(bank, "multi", TEXTS[:2])
    ]


def test_openai_client_raises_not_found_for_an_unknown_model(oai):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="x", max_tokens=2)


# -- 4. limits and malformed requests -------------------------------------------------------------
@pytest.mark.parametrize("route", ["classify", "completions"])
def test_too_many_rows_is_413(client, route):
    many = ["x"] * (LIMITS.max_rows + 1)
    if route == "classify":
        response = classify(client, "senti", many)
    else:
        response = client.post("/v1/completions", json={"model": "summ", "prompt": many})
    assert "limit is 8" in error(response, 413)


def test_an_input_field_over_max_input_chars_is_413_naming_it(client):
    message = error(classify(client, "senti", ["ok", "x" * (LIMITS.max_input_chars + 1)]), 413)
    assert "inputs[1].text" in message


@pytest.mark.parametrize("route", ["generate", "completions"])
def test_max_new_tokens_above_the_limit_is_422(client, route):
    over = LIMITS.max_new_tokens + 1
    if route == "generate":
        response = generate(client, "summ", CODE[:1], max_new_tokens=over)
    else:
        response = client.post("/v1/completions", json={"model": "summ", "prompt": "x", "max_tokens": over})
    assert str(LIMITS.max_new_tokens) in error(response, 422)


@pytest.mark.parametrize(
    "body, field",
    [({"task": "senti", "inputs": [{"review": "x"}]}, "'text'"), ({"inputs": [{"text": "x"}]}, "task")],
    ids=["input-field", "request-field"],
)
def test_a_missing_field_is_422_naming_it(client, body, field):
    assert field in error(client.post("/v1/classify", json=body), 422)


def test_an_empty_prompt_list_is_422(client):
    assert "prompt" in error(client.post("/v1/completions", json={"model": "summ", "prompt": []}), 422)
    assert "prompt" in error(client.post("/v1/completions", json={"model": "senti", "prompt": []}), 422)


def test_malformed_json_is_422_and_the_server_answers_the_next_request(client, bank):
    response = client.post(
        "/v1/classify", content=b'{"task": "senti", "inputs": [', headers={"content-type": "application/json"}
    )
    error(response, 422)
    assert_same_classes(
        classify(client, "senti", TEXTS[:1]).json()["results"], direct_classes(bank, "senti", TEXTS[:1])
    )


def test_a_full_queue_is_429_and_the_waiting_requests_still_answer(bank):
    """One row waits in a long gathering window; the queue holds 2 rows, so a 2-row request (plain or
    streamed) is refused with 429 at once; one more row closes the window and both waiting answer."""
    expected = direct_classes(bank, "senti", TEXTS[:2])
    with (
        running_server(bank, window_ms=20_000, max_rows=2, max_queue_rows=2) as base,
        httpx.Client(base_url=base, timeout=60) as c,
    ):
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(classify, c, "senti", TEXTS[:1])
            wait_until(lambda: queue_rows(c) == 1, "the first request to queue")
            assert "limit 2" in error(classify(c, "senti", TEXTS[:2]), 429)
            streamed = generate(c, "summ", CODE, stream=True)
            assert error(streamed, 429)
            second = pool.submit(classify, c, "senti", TEXTS[1:2])
            assert_same_classes(first.result().json()["results"], expected[:1])
            assert_same_classes(second.result().json()["results"], expected[1:])


@pytest.mark.parametrize("route", ["classify", "generate", "completions"])
def test_an_unknown_task_is_404(client, route):
    if route == "classify":
        response = classify(client, "nope", ["x"])
    elif route == "generate":
        response = generate(client, "nope", ["x"])
    else:
        response = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert "'nope'" in error(response, 404)


def test_a_generation_request_to_a_classification_task_is_422(client):
    assert "/v1/classify" in error(
        client.post("/v1/generate", json={"task": "senti", "inputs": [{"text": "x"}]}), 422
    )


# -- 5. safety ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outside(tmp_path_factory, tiny_backbone) -> Path:
    """A valid run outside the allowed root."""
    return write_run(tmp_path_factory.mktemp("elsewhere") / "run", tiny_backbone, SENTI, SENTI_WORDS)


@pytest.mark.parametrize("how", ["absolute", "dot-dot"])
def test_loading_a_run_outside_the_allowed_roots_is_403(client, runs, outside, how):
    path = outside if how == "absolute" else runs / ".." / outside.parent.name / outside.name
    assert "outside the allowed roots" in error(load(client, "escaped", path), 403)
    assert error(client.post("/v1/classify", json={"task": "escaped", "inputs": [{"text": "x"}]}), 404)


def test_loading_through_a_symlink_that_leaves_the_root_is_403(client, runs, outside):
    link = runs / "link-out"
    if not link.exists():
        os.symlink(outside, link)
    assert "outside the allowed roots" in error(load(client, "linked", link), 403)


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "..", "bad\n", "a" * 65])
def test_a_task_name_with_path_tricks_is_422(client, runs, name):
    assert "task name" in error(load(client, name, runs / "senti"), 422)
    assert name not in [t["name"] for t in client.get("/v1/tasks").json()["tasks"]]


def _wrong_shape(path):
    save_file({"prompt": torch.zeros(3, 7)}, str(path))


def _nan(path):
    save_file({"prompt": torch.full((3, 32), float("nan"))}, str(path))


def _not_safetensors(path):
    path.write_bytes(b"this is not a safetensors file, just some text")


@pytest.mark.parametrize(
    "damage, says",
    [
        (_wrong_shape, "the prompt is [3, 7]"),
        (_nan, "non-finite"),
        (_not_safetensors, "not a softprompt prompt file"),
    ],
    ids=["wrong-shape", "nan", "not-safetensors"],
)
def test_a_damaged_prompt_file_is_422_saying_what_is_wrong(client, runs, damage, says):
    run = copy_run(runs, "senti", f"damaged-{damage.__name__}")
    damage(run / "prompt.safetensors")
    message = error(load(client, "damaged", run), 422)
    assert "prompt.safetensors" in message and says in message
    assert client.get("/healthz").status_code == 200


def test_a_run_trained_on_another_model_is_422_naming_it(client, runs, tiny_gemma):
    run = write_run(runs / "on-gemma", tiny_gemma, SENTI, SENTI_WORDS)
    assert tiny_gemma.spec in error(load(client, "gemma-run", run), 422)


def test_a_run_that_changes_the_weights_is_422(client, runs):
    run = copy_run(runs, "senti", "lora-run")
    info = RunInfo.read(run)
    info.method = "lora"
    info.write(run)
    assert "changes the model's weights" in error(load(client, "lora", run), 422)


@pytest.fixture(scope="module")
def guarded(bank):
    with running_server(bank, token=TOKEN) as base:
        yield base


GUARDED = [  # every route but the open ones; the body, and the status a right token gets
    ("GET", "/v1/tasks", None, 200),
    ("POST", "/v1/tasks", {"name": "authed", "path": "figured"}, 201),
    ("DELETE", "/v1/tasks/{name}", None, 200),
    ("GET", "/v1/tasks/{name}/files/{file}", None, 200),
    ("POST", "/v1/classify", {"task": "senti", "inputs": [{"text": "x"}]}, 200),
    ("GET", "/v1/models", None, 200),
    ("GET", "/metrics", None, 200),
    ("POST", "/v1/completions", {"model": "summ", "prompt": "x", "max_tokens": 2}, 200),
    ("POST", "/v1/generate", {"task": "summ", "inputs": [{"input": "x"}], "max_new_tokens": 2}, 200),
]
OPEN = {("GET", "/healthz")}  # the health check (and the page, which holds no data)


@pytest.fixture
def authed(bank, runs):
    """Task "authed" loaded from a run with a figure, for the task routes; unloaded afterwards."""
    run = copy_run(runs, "senti", "figured")
    (run / "learning_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    bank.load("authed", run)
    yield
    try:
        bank.unload("authed")
    except TaskNotFound:
        pass


@pytest.mark.parametrize("method, path, body, ok", GUARDED, ids=[f"{m} {p}" for m, p, _, _ in GUARDED])
def test_every_route_needs_the_bearer_token(guarded, runs, authed, method, path, body, ok):
    path = path.format(name="authed", file="learning_curve.png")
    if body is not None and "path" in body:
        body = {**body, "path": str(runs / body["path"])}
    with httpx.Client(base_url=guarded, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            error(c.request(method, path, json=body, headers=headers), 401)
        right = c.request(method, path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == ok, right.text


def test_the_token_test_covers_every_route_but_the_open_ones(bank):
    """A route added without a line in GUARDED fails here, so no route escapes the token test (read
    from the API schema, which a server without a token publishes; the page is not in it)."""
    paths = create_app(bank, Scheduler(bank, Telemetry())).openapi()["paths"]
    served = {(method.upper(), path) for path, methods in paths.items() for method in methods}
    assert served == {(m, p) for m, p, _, _ in GUARDED} | OPEN


def test_the_openai_client_sends_the_token(guarded):
    assert "senti" in [
        m.id for m in OpenAI(base_url=guarded + "/v1", api_key=TOKEN, max_retries=0).models.list()
    ]
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=guarded + "/v1", api_key="x", max_retries=0).models.list()


def test_healthz_answers_without_the_token(guarded):
    response = httpx.get(guarded + "/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


# -- 6. loading and unloading at run time ---------------------------------------------------------
def test_a_loaded_run_answers_right_away(client, bank, runs):
    run = write_run(runs / "fresh", bank.backbone, SENTI, SENTI_WORDS, seed=11)
    response = load(client, "fresh", run)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "fresh" and response.json()["kind"] == "classification"
    try:
        assert "fresh" in [t["name"] for t in client.get("/v1/tasks").json()["tasks"]]
        assert_same_classes(
            classify(client, "fresh", TEXTS).json()["results"], direct_classes(bank, "fresh", TEXTS)
        )
    finally:
        client.delete("/v1/tasks/fresh")


def test_an_unloaded_task_answers_404(client, runs):
    assert load(client, "brief", runs / "summ").status_code == 201
    assert generate(client, "brief", CODE[:1]).status_code == 200
    assert client.delete("/v1/tasks/brief").json() == {"unloaded": "brief"}
    assert error(generate(client, "brief", CODE[:1]), 404)
    assert error(client.delete("/v1/tasks/brief"), 404)
    assert "brief" not in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_reloading_a_name_with_another_prompt_answers_with_the_new_prompt(client, bank, runs):
    """The prefix cache is keyed by the prompt's content, not the task's name: no stale states."""
    first, second = (
        write_run(runs / "v1", bank.backbone, MULTI, MULTI_WORDS, seed=21),
        write_run(runs / "v2", bank.backbone, MULTI, MULTI_WORDS, seed=22),
    )
    assert load(client, "versioned", first).status_code == 201
    before = classify(client, "versioned", TEXTS).json()["results"]
    assert load(client, "versioned", second).status_code == 201
    after = classify(client, "versioned", TEXTS).json()["results"]
    client.delete("/v1/tasks/versioned")
    uncached = TaskBank(bank.backbone, cache_mb=0, allow=[runs])
    uncached.load("versioned", second)
    assert_same_classes(after, direct_classes(uncached, "versioned", TEXTS))
    assert [r["probabilities"] for r in after] != [r["probabilities"] for r in before]


def test_unloading_tasks_while_their_requests_are_in_flight_never_breaks_the_server(client, bank, runs):
    """Threads keep asking two tasks that get unloaded and two that stay; every answer of an unloaded
    task is right or a 404, the others' are all right, and the server answers afterwards."""
    load(client, "gone-c", copy_run(runs, "senti", "gone-c")).raise_for_status()
    load(client, "gone-g", copy_run(runs, "summ", "gone-g")).raise_for_status()
    asks = {
        "gone-c": ("classify", "senti"),
        "gone-g": ("generate", "summ"),
        "multi": ("classify", "multi"),
        "explain": ("generate", "explain"),
    }
    right = {
        "senti": direct_classes(bank, "senti", TEXTS[:2]),
        "multi": direct_classes(bank, "multi", TEXTS[:2]),
        "summ": direct_texts(bank, "summ", CODE, max_new_tokens=30),
        "explain": direct_texts(bank, "explain", CODE, max_new_tokens=30),
    }
    unloaded = threading.Event()
    warmed = {name: threading.Event() for name in asks}
    answers: dict[str, list[httpx.Response]] = {name: [] for name in asks}

    def keep_asking(name):
        kind, _ = asks[name]
        after = 0
        with httpx.Client(base_url=client.base_url, timeout=60) as c:
            while after < 3:
                after += unloaded.is_set()
                if kind == "classify":
                    answers[name].append(classify(c, name, TEXTS[:2]))
                else:
                    answers[name].append(generate(c, name, CODE, max_new_tokens=30))
                if len(answers[name]) >= 2:
                    warmed[name].set()

    with ThreadPoolExecutor(len(asks)) as pool:
        futures = [pool.submit(keep_asking, name) for name in asks]
        try:
            for event in warmed.values():
                assert event.wait(30)
            assert client.delete("/v1/tasks/gone-c").status_code == 200
            assert client.delete("/v1/tasks/gone-g").status_code == 200
        finally:
            unloaded.set()  # the threads stop even when the test fails
        for future in futures:
            future.result()

    for name, (kind, source) in asks.items():
        statuses = {r.status_code for r in answers[name]}
        assert statuses <= ({200, 404} if name.startswith("gone") else {200}), (name, statuses)
        if name.startswith("gone"):
            assert statuses == {200, 404}  # answered before, refused after
        for response in answers[name]:
            if response.status_code == 404:
                error(response, 404)
            elif kind == "classify":
                assert_same_classes(response.json()["results"], right[source])
            else:
                assert [r["text"] for r in response.json()["results"]] == right[source]
    assert client.get("/healthz").status_code == 200
    assert_same_classes(classify(client, "multi", TEXTS[:2]).json()["results"], right["multi"])


@pytest.mark.parametrize("path", ["/v1/tasks", "/v1/models"])
def test_listing_the_tasks_while_a_load_writes_the_table_answers(client, bank, runs, monkeypatch, path):
    """A load lands while the list is being built (here from inside the first task's `kind`, which
    the list reads): the list is made from a copy of the table taken under the bank's lock, so the
    load neither breaks it (a dict changed during iteration) nor waits for it."""
    kind, started = ServedTask.kind, []

    def loading_meanwhile(task):
        if not started:
            started.append(True)
            bank.load("racer", runs / "senti")
        return kind.fget(task)

    monkeypatch.setattr(ServedTask, "kind", property(loading_meanwhile))
    try:
        response = client.get(path)
    finally:
        monkeypatch.undo()
        if started:
            bank.unload("racer")
    assert started and response.status_code == 200, response.text


def test_a_steady_stream_of_classifications_does_not_starve_a_generation(bank, monkeypatch):
    """Batches of one row; each classification batch is held until the next classification has
    arrived, so the classification queue is never empty when a batch ends. A generation must still
    get its decoding steps between the classification rounds."""
    schedulers, stop = [], threading.Event()
    submit, scores = Scheduler.submit, bank.classify_prepared

    def spy(self, job):
        schedulers.append(self)
        return submit(self, job)

    def held(batch):
        deadline = time.monotonic() + 5
        while not schedulers[-1].classify_queue and not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.001)
        return scores(batch)

    monkeypatch.setattr(Scheduler, "submit", spy)
    monkeypatch.setattr(bank, "classify_prepared", held)
    expected = direct_texts(bank, "summ", CODE[:1], max_new_tokens=20)
    with running_server(bank, max_rows=1) as base, httpx.Client(base_url=base, timeout=60) as c:

        def keep_classifying():
            while not stop.is_set():
                assert classify(c, "senti", TEXTS[:1]).status_code == 200

        with ThreadPoolExecutor(2) as pool:
            streams = [pool.submit(keep_classifying) for _ in range(2)]
            try:
                wait_until(lambda: len(schedulers) >= 4, "the classifications to flow")
                answer = c.post(
                    "/v1/generate",
                    json={"task": "summ", "inputs": rows(CODE[:1], "input"), "max_new_tokens": 20},
                    timeout=20,
                )
            finally:
                stop.set()
            for future in streams:
                future.result()
    assert answer.status_code == 200 and [r["text"] for r in answer.json()["results"]] == expected


# -- 7. clients that go away, failures that must stay local -----------------------------------------
def test_a_client_leaving_mid_stream_stops_its_decoding_and_the_server_goes_on(client, bank, monkeypatch):
    decodings, answered = [], []
    start = bank.start_decoding

    def spy(batch):
        decoding = start(batch)
        release = decoding.release

        def record(row):  # the row's answer length, before the decoding forgets it
            answered.append(len(decoding.generated[row]))
            release(row)

        decoding.release = record
        decodings.append(decoding)
        return decoding

    monkeypatch.setattr(bank, "start_decoding", spy)
    body = {"task": "summ", "inputs": [{"input": CODE[0]}], "max_new_tokens": 1500, "stream": True}
    with client.stream("POST", "/v1/generate", json=body) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(first[len("data: ") :])["index"] == 0
    decoding = decodings[-1]
    wait_until(lambda: decoding.done, "the left stream's decoding to end")
    assert decoding.cancelled == {0} and answered and answered[0] < 1500
    assert [r["text"] for r in generate(client, "summ", CODE).json()["results"]] == direct_texts(
        bank, "summ", CODE
    )
    assert_same_classes(
        classify(client, "senti", TEXTS[:1]).json()["results"], direct_classes(bank, "senti", TEXTS[:1])
    )


def test_a_client_leaving_during_a_beam_search_does_not_fail_its_batch_neighbours(bank, monkeypatch):
    """A streamed beam-search request and a greedy one are gathered into one batch; the beam search
    is held until the streaming client has left (its job cancelled), then let go: the greedy
    request still answers right."""
    jobs, entered, release = [], threading.Event(), threading.Event()
    submit, model = Scheduler.submit, bank.get("beams").model
    search = model.beam_search

    def spy(self, job):
        jobs.append(job)
        return submit(self, job)

    def held(*args):
        entered.set()
        assert release.wait(30)
        return search(*args)

    monkeypatch.setattr(Scheduler, "submit", spy)
    monkeypatch.setattr(model, "beam_search", held)
    expected = direct_texts(bank, "summ", CODE[:1])
    with (
        running_server(bank, window_ms=20_000, max_rows=2) as base,
        httpx.Client(base_url=base, timeout=60) as c,
    ):
        with ThreadPoolExecutor(1) as pool:
            with c.stream(
                "POST", "/v1/generate", json={"task": "beams", "inputs": [{"input": "x"}], "stream": True}
            ):
                wait_until(lambda: len(jobs) == 1, "the beam request to queue")
                neighbour = pool.submit(generate, c, "summ", CODE[:1])
                assert entered.wait(30)
            beam_job = next(j for j in jobs if j.task.name == "beams")
            wait_until(lambda: beam_job.cancelled, "the server to see the client leave")
            assert c.get("/healthz").status_code == 200  # the server's loop has run what the leaving queued
            release.set()
            answer = neighbour.result()
        assert answer.status_code == 200, answer.text
        assert [r["text"] for r in answer.json()["results"]] == expected


def test_rows_that_fail_to_join_a_decoding_fail_alone_and_the_decoding_goes_on(client, bank, monkeypatch):
    """A long generation is decoding; a second request's rows fail as they join it: that request
    answers 500 in the error shape, the long one still answers right, and the server goes on."""
    started = threading.Event()
    start, join = bank.start_decoding, bank.join_decoding

    def spy_start(batch):
        decoding = start(batch)
        started.set()
        return decoding

    def broken_join(decoding, batch):
        raise RuntimeError("the accelerator caught fire")

    expected = direct_texts(bank, "summ", CODE[:1], max_new_tokens=400)
    monkeypatch.setattr(bank, "start_decoding", spy_start)
    monkeypatch.setattr(bank, "join_decoding", broken_join)
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(generate, client, "summ", CODE[:1], max_new_tokens=400)
        assert started.wait(30)
        failed = generate(client, "explain", CODE[:1])
        error(failed, 500)
        answer = long.result(timeout=30)
    assert answer.status_code == 200, answer.text
    assert [r["text"] for r in answer.json()["results"]] == expected
    monkeypatch.setattr(bank, "join_decoding", join)
    assert [r["text"] for r in generate(client, "summ", CODE).json()["results"]] == direct_texts(
        bank, "summ", CODE
    )


def test_a_decoding_step_that_fails_fails_its_requests_and_the_server_goes_on(client, bank, monkeypatch):
    start = bank.start_decoding

    def broken_start(batch):
        decoding = start(batch)

        def broken():
            raise RuntimeError("the accelerator caught fire")

        decoding.step = broken
        return decoding

    monkeypatch.setattr(bank, "start_decoding", broken_start)
    error(generate(client, "summ", CODE[:1]), 500)
    monkeypatch.setattr(bank, "start_decoding", start)
    assert [r["text"] for r in generate(client, "summ", CODE).json()["results"]] == direct_texts(
        bank, "summ", CODE
    )


SECRET = "/srv/models/secret.bin: the accelerator caught fire"


@pytest.mark.parametrize("where", ["batch", "route", "stream"])
def test_a_500_says_only_a_generic_message_and_the_log_has_the_details(
    client, bank, monkeypatch, caplog, where
):
    """A failure in a batch, in a route, or in a stream: the client reads a generic message with an
    id, the server log has that id with the exception."""

    def broken(*args, **kwargs):
        raise RuntimeError(SECRET)

    caplog.set_level(logging.ERROR)
    if where == "batch":
        monkeypatch.setattr(bank, "classify_prepared", broken)
        message = error(classify(client, "senti", TEXTS[:1]), 500)
    elif where == "route":
        monkeypatch.setattr(ServedTask, "describe", broken)
        message = error(client.get("/v1/tasks"), 500)
    else:
        monkeypatch.setattr(bank, "start_decoding", broken)
        with client.stream(
            "POST", "/v1/generate", json={"task": "summ", "inputs": rows(CODE[:1], "input"), "stream": True}
        ) as r:
            last = events(r)[-1]
        assert last["error"]["code"] == 500 and last["error"]["type"] == "server_error"
        message = last["error"]["message"]
    assert "secret" not in message and "caught fire" not in message
    error_id = re.search(r"error id (\w+)", message).group(1)
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and any(r.exc_info and SECRET in str(r.exc_info[1]) for r in logged), caplog.text


def test_long_running_decodings_forget_the_rows_they_have_answered(client, bank, monkeypatch):
    decodings = []
    start = bank.start_decoding

    def spy(batch):
        decodings.append(start(batch))
        return decodings[-1]

    monkeypatch.setattr(bank, "start_decoding", spy)
    generate(client, "summ", CODE, max_new_tokens=6).raise_for_status()
    assert decodings[-1].done
    assert decodings[-1].rows == [None] * len(CODE) and decodings[-1].generated == [[]] * len(CODE)


# -- 8. the prefix cache --------------------------------------------------------------------------
def test_a_second_request_of_a_task_is_a_prefix_cache_hit(client, bank, runs):
    run = write_run(runs / "cached", bank.backbone, SENTI, SENTI_WORDS, seed=31)
    assert load(client, "cached", run).status_code == 201
    try:
        hits, misses = bank.cache.hits, bank.cache.misses
        classify(client, "cached", TEXTS[:1]).raise_for_status()
        assert (bank.cache.hits, bank.cache.misses) == (hits, misses + 1)
        classify(client, "cached", TEXTS[1:2]).raise_for_status()
        assert (bank.cache.hits, bank.cache.misses) == (hits + 1, misses + 1)
        gauge = samples(client, "softprompt_prefix_cache_hits")
        assert gauge[("softprompt_prefix_cache_hits", ())] == bank.cache.hits
    finally:
        client.delete("/v1/tasks/cached")


def test_a_small_prefix_cache_stays_within_its_bound_and_evicts_the_least_recently_used(tiny_backbone, runs):
    """Room for two of three equal prefixes: A, B, C leaves B and C; B again (a hit) makes C the
    oldest, so A (a miss) evicts C, and C is a miss again."""
    names = ["senti", "senti2", "senti3"]
    probe = make_bank(tiny_backbone, runs, cache_mb=0, names=names)
    sizes = {probe.prepare(probe.get(n), [{"text": "x"}]).prefix.nbytes for n in names}
    assert len(sizes) == 1
    size = sizes.pop()
    bank = make_bank(tiny_backbone, runs, cache_mb=2.5 * size / 2**20, names=names)
    a, b, c = names
    with running_server(bank) as base, httpx.Client(base_url=base, timeout=30) as http:
        seen = []
        for name in [a, b, c, b, a, c]:
            hits = bank.cache.hits
            assert_same_classes(
                classify(http, name, TEXTS[:1]).json()["results"], direct_classes(probe, name, TEXTS[:1])
            )
            seen.append("hit" if bank.cache.hits > hits else "miss")
            assert bank.cache.bytes <= bank.cache.max_bytes and len(bank.cache.entries) <= 2
        cache_bytes = samples(http, "softprompt_prefix_cache_bytes")[("softprompt_prefix_cache_bytes", ())]
    assert seen == ["miss", "miss", "miss", "hit", "miss", "miss"]
    assert cache_bytes == bank.cache.bytes == 2 * size


def test_no_prefix_cache_gives_the_same_answers_as_a_cached_bank(tiny_backbone, runs, client):
    bank = make_bank(tiny_backbone, runs, cache_mb=0, names=["multi", "summ"])
    with running_server(bank) as base, httpx.Client(base_url=base, timeout=30) as uncached:
        for _ in range(2):
            assert_same_classes(
                classify(uncached, "multi", TEXTS).json()["results"],
                classify(client, "multi", TEXTS).json()["results"],
            )
            assert (
                generate(uncached, "summ", CODE).json()["results"]
                == generate(client, "summ", CODE).json()["results"]
            )
    assert bank.cache.bytes == 0 and not bank.cache.entries


def test_a_streamed_completion_never_sends_the_start_of_a_stop_string_the_answer_cuts(client, oai):
    """The tiny model answers ':' greedily, so with stop '::' the answer is cut before its second
    token: the first ':' must not have gone out as a piece."""
    body = {"model": "summ", "prompt": CODE[0], "max_tokens": 6, "stop": ["::"]}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    chunks = oai.completions.create(**body, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == plain == ""


@pytest.mark.parametrize("method, path, status", [("GET", "/nope", 404), ("DELETE", "/healthz", 405)])
def test_unknown_routes_and_methods_answer_in_the_error_shape(client, method, path, status):
    error(client.request(method, path), status)


def test_a_running_decoding_never_holds_more_distinct_tasks_than_the_cap(tiny_backbone, runs):
    """Requests of 3 generation tasks arrive while a decoding runs; with --batch-tasks 2 the rows
    decoding at once never belong to more than 2 tasks, and every answer is still right."""
    bank = make_bank(tiny_backbone, runs, names=("summ", "explain", "senti"))
    write_run(runs / "summ_b", tiny_backbone, SUMM, seed=9, generation={"max_new_tokens": 8})
    bank.load("summ_b", runs / "summ_b")
    seen, start, join = [], bank.start_decoding, bank.join_decoding

    def tasks_of(decoding):
        return {decoding.rows[r].generator.lm.prompt.vectors.data_ptr() for r in decoding.active}

    def spy_start(batch):
        decoding = start(batch)
        seen.append(len(tasks_of(decoding)))
        return decoding

    def spy_join(decoding, batch):
        join(decoding, batch)
        seen.append(len(tasks_of(decoding)))

    bank.start_decoding, bank.join_decoding = spy_start, spy_join
    expected = {
        name: direct_texts(bank, name, CODE[:1], max_new_tokens=40) for name in ("summ", "explain", "summ_b")
    }
    with running_server(bank, max_tasks=2, window_ms=0) as base, httpx.Client(base_url=base, timeout=60) as c:
        with ThreadPoolExecutor(6) as pool:
            futures = {
                pool.submit(generate, c, name, CODE[:1], max_new_tokens=40): name
                for name in ("summ", "explain", "summ_b") * 2
            }
            for future, name in futures.items():
                assert [r["text"] for r in future.result().json()["results"]] == expected[name]
    assert seen and max(seen) <= 2


def test_a_body_over_the_size_limit_is_413_before_it_is_read(bank):
    limits = Limits(max_body_bytes=1000)
    with running_server(bank, limits=limits) as base, httpx.Client(base_url=base, timeout=30) as c:
        big = {"task": "senti", "inputs": [{"text": "x" * 2000}]}
        assert "limit is 1000" in error(c.post("/v1/classify", json=big), 413)
        small = c.post("/v1/classify", json={"task": "senti", "inputs": [{"text": "ok"}]})
        assert small.status_code == 200


def test_a_chunked_body_over_the_limit_is_413_before_the_client_has_sent_it_all(bank):
    """No Content-Length: the server counts the bytes as they arrive and answers 413 once they pass
    the limit, while the body is still unfinished (its last chunk never sent)."""
    limits = Limits(max_body_bytes=1000)
    with running_server(bank, limits=limits) as base:
        host, port = base.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=20)
        connection.putrequest("POST", "/v1/classify")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        for piece in [b'{"task": "senti", "inputs": [{"text": "ok"}], "pad": "'] + [b"x" * 500] * 4:
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        response = connection.getresponse()
        body = json.loads(response.read())
        connection.close()
    assert response.status == 413 and body["error"]["code"] == 413
    assert "limit is 1000" in body["error"]["message"]


def test_a_large_chunked_body_is_413_and_the_server_stops_reading_it(bank):
    """A client streaming 64 MB without a Content-Length gets the 413, and the server closes the
    connection long before the client has sent it all."""
    total, sent = 64 * 2**20, [0]

    def body():
        yield b'{"task": "senti", "inputs": [{"text": "ok"}], "pad": "'
        chunk = b"x" * 2**16
        while sent[0] < total:
            sent[0] += len(chunk)
            yield chunk
        yield b'"}'

    with running_server(bank, limits=Limits(max_body_bytes=1000)) as base:
        response = httpx.post(
            base + "/v1/classify", content=body(), headers={"content-type": "application/json"}, timeout=30
        )
    assert "limit is 1000" in error(response, 413)
    assert sent[0] < total // 2


def test_with_a_token_the_api_schema_is_not_published(guarded, url, client):
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(guarded + path).status_code == 404
        assert client.get(path).status_code == 200  # the server without a token publishes it


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_request_after_the_scheduler_stopped_is_503_at_once(bank, stream):
    from fastapi.testclient import TestClient

    scheduler = Scheduler(bank, Telemetry()).start()
    scheduler.stop()
    with TestClient(create_app(bank, scheduler)) as stopped:
        assert "shutting down" in error(classify(stopped, "senti", TEXTS[:1]), 503)
        body = {"task": "summ", "inputs": rows(CODE, "input"), "stream": stream, "max_new_tokens": 4}
        assert "shutting down" in error(stopped.post("/v1/generate", json=body), 503)
