"""The server's web page in a real browser: Debian's chromium driven by Playwright, against a real
server (uvicorn on a loopback port) over runs on the tiny model.

No browser download: Playwright starts /usr/bin/chromium, and the test is skipped where that or
Playwright is missing. Set SOFTPROMPT_SCREENSHOT=PATH to keep a full-page screenshot."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from serving import running_server

from softprompt.run import RunInfo
from softprompt.serve.app import Limits
from softprompt.serve.bank import TaskBank

from helpers import write_run

CHROMIUM = Path("/usr/bin/chromium")
# the background-networking flags keep chromium from calling out to a network it cannot reach
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000  # the most any wait may take on a busy machine; each ends as soon as the page is ready
LIMITS = Limits(max_new_tokens=32)
REVIEW = "a great film, lovely and moving"
SOURCE = "def add(a, b): return a + b"
LOADED = "img => img.complete && img.naturalWidth > 0"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (the set-up script installs Debian's chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as err:
        pytest.skip(f"playwright cannot be imported: {err}")
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def bank(tiny_backbone, tmp_path_factory):
    """A classification task (with dev metrics and both figures) and a generation task."""
    root = tmp_path_factory.mktemp("page-runs")
    verbalizer = {"positive": ["code"], "negative": ["Sentiment"]}
    sentiment = write_run(
        root / "sentiment", tiny_backbone, "{soft:3} Review: {text} Sentiment: {label}", verbalizer
    )
    generation = {"max_new_tokens": 12, "num_beams": 1, "stop": ["\n"]}
    summary = write_run(
        root / "summary", tiny_backbone, "{soft:4} Code: {input} Summary: {target}", generation=generation
    )
    with_metrics(sentiment, {"dev": {"n": 10, "accuracy": 0.8, "macro_f1": 0.79}, "best_step": 6, "steps": 8})
    with_metrics(summary, {"dev": {"n": 10, "bleu": 26.2, "rouge_l": 54.0}})
    write_figure(sentiment / "learning_curve.png")
    write_figure(sentiment / "confusion_matrix.png")
    bank = TaskBank(tiny_backbone, allow=[root])
    bank.load("sentiment", sentiment)
    bank.load("summary", summary)
    return bank


def with_metrics(folder: Path, metrics: dict) -> None:
    info = RunInfo.read(folder)
    info.metrics = metrics
    info.write(folder)


def write_figure(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2), dpi=60)
    ax.plot([0, 2, 4, 6, 8], [0.9, 0.6, 0.45, 0.4, 0.38])
    ax.set_title(path.stem)
    fig.savefig(path)
    plt.close(fig)


@dataclass
class Tab:
    """A page in a fresh browser context (empty localStorage), with what it asked for and what went
    wrong in it."""

    page: object
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def console(self, message) -> None:
        # chromium logs every non-2xx reply as a console error: those the test provokes are no fault
        if message.type == "error" and not message.text.startswith("Failed to load resource: the server"):
            self.errors.append(message.text)

    def only_local(self, base: str) -> None:
        strays = [u for u in self.requests if not u.startswith((base + "/", "blob:", "data:"))]
        assert not strays, f"the page asked for something outside the server: {strays}"


@pytest.fixture
def tab(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    tab = Tab(page)
    page.on("request", lambda request: tab.requests.append(request.url))
    page.on("pageerror", lambda err: tab.errors.append(str(err)))
    page.on("console", tab.console)
    try:
        yield tab
    finally:
        context.close()


def test_page_lists_tasks_and_runs_them(bank, tab, tmp_path):
    from playwright.sync_api import expect

    page = tab.page
    with running_server(bank, limits=LIMITS) as url:
        page.goto(url + "/")
        tasks = page.locator("section[data-task]")
        expect(tasks).to_have_count(2)
        names = tasks.evaluate_all("nodes => nodes.map(n => n.dataset.task)")
        assert sorted(names) == ["sentiment", "summary"]

        # classification: the description, then the answer as one bar per label, most likely first
        sentiment = page.locator('[data-task="sentiment"]')
        expect(sentiment).to_contain_text("{soft:3} Review: {text} Sentiment: {label}")
        expect(sentiment.locator('[data-metric="accuracy"]')).to_contain_text("80.0%")
        sentiment.locator('textarea[data-field="text"]').fill(REVIEW)
        sentiment.locator('[data-role="submit"]').click()
        label = sentiment.locator('[data-role="label"]')
        expect(label).not_to_have_text("")
        bars = sentiment.locator('[data-role="bar"]')
        expect(bars).to_have_count(2)
        labels = bars.evaluate_all("nodes => nodes.map(n => n.dataset.label)")
        assert sorted(labels) == ["negative", "positive"]
        shown = sentiment.locator('[data-role="bar"] [data-role="percent"]').all_text_contents()
        percents = [float(text.rstrip("%")) for text in shown]
        assert abs(sum(percents) - 100) < 0.3, shown
        assert percents == sorted(percents, reverse=True), shown
        answer = httpx.post(url + "/v1/classify", json={"task": "sentiment", "inputs": [{"text": REVIEW}]})
        assert label.text_content() == answer.json()["results"][0]["label"] == labels[0]

        # the figures come through fetch() (which carries the token) as blobs, and are decoded
        for file in ("learning_curve.png", "confusion_matrix.png"):
            image = sentiment.locator(f'img[data-file="{file}"]')
            expect(image).to_have_attribute("src", re.compile(r"^blob:"))
            page.wait_for_function(LOADED, arg=image.element_handle())

        # generation: an error reply shows in the form, in red; then the streamed answer
        summary = page.locator('[data-task="summary"]')
        new_tokens = summary.locator('[data-role="max-new-tokens"]')
        expect(new_tokens).to_have_value("12")  # the run's own setting
        expect(summary.locator('[data-metric="rouge_l"]')).to_contain_text("54.0")
        summary.locator('textarea[data-field="input"]').fill(SOURCE)
        new_tokens.fill("999")
        summary.locator('[data-role="submit"]').click()
        error = summary.locator('[data-role="error"]')
        expect(error).to_contain_text("above this server's limit of 32")
        expect(error).to_be_visible()
        assert error.evaluate("e => getComputedStyle(e).color") == "rgb(198, 40, 40)"

        new_tokens.fill("10")
        summary.locator('[data-role="submit"]').click()
        output = summary.locator('[data-role="output"]')
        expect(output).to_have_attribute("data-state", "done")
        expect(error).to_be_hidden()
        request = {"task": "summary", "inputs": [{"input": SOURCE}], "max_new_tokens": 10}
        reference = httpx.post(url + "/v1/generate", json=request).json()["results"][0]["text"]
        assert reference and output.text_content() == reference
        assert int(output.get_attribute("data-pieces")) > 0, "the pieces were shown as they streamed in"

        shot = Path(os.environ.get("SOFTPROMPT_SCREENSHOT") or tmp_path / "page.png")
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
        tab.only_local(url)
        assert not tab.errors


def test_page_asks_for_the_token(bank, tab):
    from playwright.sync_api import expect

    page = tab.page
    with running_server(bank, token="s3cret", limits=LIMITS) as url:
        page.goto(url + "/")
        notice = page.locator('[data-role="notice"]')
        expect(notice).to_contain_text("needs an API token")
        expect(notice).to_be_visible()
        tasks = page.locator("section[data-task]")
        expect(tasks).to_have_count(0)

        token = page.locator('[data-role="token"]')
        token.fill("wrong")
        token.press("Enter")
        expect(notice).to_contain_text("refused this token")

        token.fill("s3cret")
        page.locator('[data-role="token-save"]').click()
        expect(tasks).to_have_count(2)
        expect(notice).to_be_hidden()
        image = page.locator('[data-task="sentiment"] img[data-file="learning_curve.png"]')
        page.wait_for_function(LOADED, arg=image.element_handle())  # the figures need the token too

        # kept in localStorage across a reload; and the page fits a phone's width
        page.set_viewport_size({"width": 390, "height": 800})
        page.reload()
        expect(tasks).to_have_count(2)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        tab.only_local(url)
        assert not tab.errors
