"""The playground page (GET /) in a real browser: Debian's chromium driven by Playwright, against a
real gunicorn serving the endless model (max_tokens decides every length)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SYSTEM = "You are a guide to the old town."
QUESTION = "Tell me about the river and the old town. <b>Not bold</b> & 'quoted'"
# True at one moment in the page: the answer has text and is still streaming.
PARTIAL = """() => {
  const answer = document.querySelector("#messages .assistant:last-of-type .content");
  const streaming = document.body.dataset.state === "streaming" && !document.querySelector("#stop").disabled;
  return answer && streaming && answer.textContent.length > 0 ? answer.textContent : null;
}"""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (apt-get install "
                                "chromium): the playground is tested in a real browser")


@pytest.fixture(scope="module", autouse=True)
def patient_expect() -> Iterator:
    expect.set_options(timeout=15_000)
    yield
    expect.set_options(timeout=5_000)  # Playwright's default


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(server_factory, slow_model):
    return server_factory(CHATGLM_MODEL=str(slow_model))


class Page:
    """A fresh browser context on the server's playground, recording what the page did."""

    def __init__(self, browser, base_url: str, **context_options) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 820}, color_scheme="light",
                                           **context_options)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.requests: list[str] = []
        self.problems: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        response = self.page.goto(base_url + "/")
        assert response is not None and response.status == 200
        self.csp = response.headers.get("content-security-policy", "")


@pytest.fixture
def open_page(browser) -> Iterator:
    pages: list[Page] = []

    def make(base_url: str, **context_options) -> Page:
        pages.append(Page(browser, base_url, **context_options))
        return pages[-1]

    yield make
    for p in pages:
        p.context.close()


def test_streams_an_answer_with_usage_timings_and_snippets(server, open_page):
    view = open_page(server.base_url, permissions=["clipboard-read", "clipboard-write"])
    page = view.page
    expect(page.locator("#model option")).to_have_text(["endless"])
    expect(page.locator("#model")).to_have_value("endless")
    expect(page.locator("#base-url")).to_have_text(server.v1)

    page.fill("#system", SYSTEM)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "300")
    page.fill("#prompt", QUESTION)
    expect(page.locator("#curl-snippet")).to_contain_text('"max_tokens": 300')  # follows what is typed
    page.click("#send")

    # (1) text shows while the answer is still streaming, and keeps growing after that
    partial = page.wait_for_function(PARTIAL).json_value()
    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=60_000)
    expect(page.locator("#stop")).to_be_disabled()
    answers = page.locator("#messages .assistant")
    expect(answers).to_have_count(1)
    final = answers.locator(".content").text_content()
    assert partial and final.startswith(partial) and len(final) > len(partial)

    # (2) the same text as the same request answered whole
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    reference = requests.post(server.v1 + "/chat/completions", timeout=60, json={
        "model": "endless", "messages": messages, "temperature": 0, "max_tokens": 300}).json()
    assert final == reference["choices"][0]["message"]["content"]

    # (3) usage, time to first token and speed
    usage = reference["usage"]
    expect(page.locator("#stat-completion")).to_have_text("300")
    expect(page.locator("#stat-prompt")).to_have_text(str(usage["prompt_tokens"]))
    expect(page.locator("#stat-total")).to_have_text(str(usage["total_tokens"]))
    expect(page.locator("#stat-tps")).to_have_text(re.compile(r"^\d+\.\d tok/s$"))
    expect(page.locator("#stat-ttft")).to_have_text(re.compile(r"^\d+ ms$|^\d+\.\d\d s$"))
    expect(page.locator("#stat-finish")).to_have_text("length")
    # the question is shown as text, never as markup
    expect(page.locator("#messages .user .content")).to_have_text(QUESTION)
    expect(page.locator("#messages b")).to_have_count(0)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

    # (4) the snippets are the request just made, and they work
    curl = page.locator("#curl-snippet").text_content()
    python = page.locator("#python-snippet").text_content()
    assert "/v1/chat/completions" in curl and '"model": "endless"' in curl
    assert 'model="endless"' in python and f'base_url="{server.v1}"' in python
    page.click("#copy-curl")
    expect(page.locator("#copy-curl")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == curl
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    run = subprocess.run([sys.executable, "-c", python], check=False, capture_output=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr.decode()
    printed = run.stdout.decode()
    assert printed.startswith(final) and "completion_tokens=300" in printed[len(final):]
    if shutil.which("curl") and shutil.which("sh"):
        out = subprocess.run(["sh", "-c", curl], capture_output=True, timeout=60, check=True).stdout.decode()
        events = [e.removeprefix("data: ") for e in out.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == final
        assert chunks[-1]["usage"]["completion_tokens"] == 300

    # Stop ends a running answer; what came so far stays; Clear empties the chat.
    page.fill("#max-tokens", "100000")
    page.fill("#prompt", "And the bridge?")
    page.press("#prompt", "Enter")
    page.wait_for_function(PARTIAL)
    page.click("#stop")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#stat-finish")).to_have_text("stopped")
    expect(answers).to_have_count(2)
    expect(answers.nth(1)).to_have_class(re.compile(r"\bstopped\b"))
    assert answers.nth(1).locator(".content").text_content()
    expect(page.locator("#send")).to_be_enabled()
    page.click("#clear")
    expect(page.locator("#messages > *")).to_have_count(0)
    expect(page.locator("#stat-completion")).to_have_text("–")
    # Clear while an answer streams: it stops, and nothing of it comes back into the new chat.
    page.fill("#prompt", "One more thing")
    page.click("#send")
    page.wait_for_function(PARTIAL)
    page.click("#clear")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#messages > *")).to_have_count(0)
    expect(page.locator("#stat-finish")).to_have_text("–")
    expect(page.locator("#curl-snippet")).not_to_contain_text("One more thing")
    expect(page.locator("#curl-snippet")).to_contain_text('"content": "Hello!"')  # the example again

    # offline: the page loaded nothing from anywhere else, and nothing broke (the CSP included)
    assert all(url.startswith((server.base_url + "/", "data:")) for url in view.requests), view.requests
    assert view.problems == []
    assert "script-src 'sha256-" in view.csp and "connect-src 'self'" in view.csp


def test_a_wrong_api_key_shows_the_401(server_factory, demo_model, open_page):
    server = server_factory(CHATGLM_MODEL=str(demo_model), API_KEYS="right-key")
    page = open_page(server.base_url).page
    expect(page.locator("#model-status")).to_contain_text("Error 401: You didn't provide an API key")

    page.fill("#api-key", "right-key")
    expect(page.locator("#model option")).to_have_text(["demo"])
    expect(page.locator("#curl-snippet")).to_contain_text("Authorization: Bearer $OPENAI_API_KEY")
    expect(page.locator("#curl-snippet")).not_to_contain_text("right-key")  # the key stays off the screen

    page.fill("#api-key", "wrong-key")
    expect(page.locator("#model-status")).to_contain_text("Error 401: Incorrect API key provided.")
    page.fill("#prompt", "Hello")
    page.click("#send")
    error = page.locator("#messages .error")
    expect(error).to_have_text(re.compile(r"Error 401: Incorrect API key provided\. \(invalid_api_key\)"))
    expect(page.locator("#messages .assistant")).to_have_count(0)
    expect(page.locator("#prompt")).to_have_value("Hello")  # given back, to send again with the right key
    expect(page.locator("body")).to_have_attribute("data-state", "idle")

    page.reload()  # the key is remembered by this browser
    expect(page.locator("#api-key")).to_have_value("wrong-key")


def test_error_events_mid_stream_and_non_json_errors_are_shown(server, open_page):
    """Answers no aigate model gives on demand, played to the page by Playwright's routing."""
    page = open_page(server.base_url).page
    models = {"object": "list", "data": [{"id": i, "object": "model"} for i in
                                         ("@cf/meta/llama-3.1-8b-instruct", "@cf/baai/bge-small-en-v1.5", "endless")]}
    page.route("**/v1/models", lambda route: route.fulfill(json=models))
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "endless"}
    events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {**chunk, "choices": [{"index": 0, "delta": {"content": "<i>Hello"}}]},
              {**chunk, "choices": [{"index": 0, "delta": {"content": " there</i>"}}]},
              {"error": {"message": "The upstream model failed.", "type": "server_error", "code": "upstream_error"}}]
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(body=stream, content_type="text/event-stream"))
    page.click("#reload-models")
    # embedding models are listed but cannot be picked for a chat
    expect(page.locator("#model option:not([disabled]):not(optgroup[disabled] option)")).to_have_text(
        ["@cf/meta/llama-3.1-8b-instruct", "endless"])
    expect(page.locator("#model optgroup")).to_have_attribute("label", re.compile("Embedding"))
    page.select_option("#model", "endless")

    page.fill("#prompt", "Hi")
    page.click("#send")
    expect(page.locator("#messages .error")).to_have_text(
        re.compile(r"The stream failed: The upstream model failed\. \(upstream_error\)"))
    expect(page.locator("#messages .assistant .content")).to_have_text("<i>Hello there</i>")
    expect(page.locator("#messages i")).to_have_count(0)
    expect(page.locator("#messages .user")).to_have_class(re.compile(r"\bunsent\b"))
    expect(page.locator("#prompt")).to_have_value("Hi")

    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=502, body="<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html"))
    page.click("#send")
    expect(page.locator("#messages .error").last).to_have_text(
        "Error 502: <html><body><h1>502 Bad Gateway</h1></body></html>")
    expect(page.locator("#messages h1")).to_have_count(0)


def test_a_schema_box_for_the_models_that_honour_one(server, open_page):
    """The JSON schema box shows for a model whose capabilities.structured_outputs is true, and its schema is
    sent as response_format json_schema (the models and the answer played by Playwright's routing)."""
    page = open_page(server.base_url).page
    models = {"object": "list", "data": [
        {"id": "endless", "object": "model", "capabilities": {"structured_outputs": False}},
        {"id": "@cf/meta/llama-3.1-8b-instruct", "object": "model", "capabilities": {"structured_outputs": True}}]}
    page.route("**/v1/models", lambda route: route.fulfill(json=models))
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    stream = "".join(f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': delta}]})}\n\n"
                     for delta in ({"role": "assistant", "content": ""}, {"content": '{"city": "Paris"}'})
                     ) + "data: [DONE]\n\n"
    sent: list[dict] = []

    def answer(route) -> None:
        sent.append(json.loads(route.request.post_data))
        route.fulfill(body=stream, content_type="text/event-stream")

    page.route("**/v1/chat/completions", answer)
    page.click("#reload-models")
    page.select_option("#model", "endless")
    expect(page.locator("#schema-field")).to_be_hidden()
    page.select_option("#model", "@cf/meta/llama-3.1-8b-instruct")
    expect(page.locator("#schema-field")).to_be_visible()

    page.fill("#schema", "{not json")
    page.fill("#prompt", "Where?")
    page.click("#send")
    expect(page.locator("#messages .error")).to_contain_text("The JSON schema is not valid JSON")
    expect(page.locator("#prompt")).to_have_value("Where?")  # nothing sent: fix the schema and send again
    assert sent == []

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    page.fill("#schema", json.dumps(schema))
    expect(page.locator("#curl-snippet")).to_contain_text('"response_format"')
    page.click("#send")
    expect(page.locator("#messages .assistant .content")).to_have_text('{"city": "Paris"}')
    assert sent[-1]["response_format"] == {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}

    page.select_option("#model", "endless")  # the box hides, and its schema is not sent to a model that would refuse
    expect(page.locator("#schema-field")).to_be_hidden()
    page.fill("#prompt", "And now?")
    page.click("#send")
    expect(page.locator("#messages .assistant")).to_have_count(2)
    assert "response_format" not in sent[-1]
