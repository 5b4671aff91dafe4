"""Several local models, loaded on demand: the real engine on two demo models (loads, unloads, the limit,
the keep-alive, a request waiting for a load), and under gunicorn (/v1/models, /ready, a bad entry at start)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from backends.base import ChatRequest, Finish, Message, QueueTimeout
from backends.chatglm.engine.client import EngineClient
from tests.conftest import GUNICORN, ROOT, engine_socket


@dataclass
class Engine:
    process: subprocess.Popen[str]
    client: EngineClient
    log: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_for_log(self, text: str, timeout: float = 30) -> str:
        with self.changed:
            assert self.changed.wait_for(lambda: any(text in line for line in self.log), timeout), "".join(self.log)
            return next(line for line in self.log if text in line)

    def wait_for_counts(self, timeout: float = 30, **counts: int) -> str:
        """The log, once each text (a keyword's value below, by name) is in it as many times as asked: a line
        written as a state changes may reach the reader a moment after the state is seen."""
        with self.changed:
            done = self.changed.wait_for(lambda: all("".join(self.log).count(t) == n for t, n in counts.items()),
                                         timeout)
            assert done, "".join(self.log)
            return "".join(self.log)

    def states(self) -> dict[str, str]:
        status = self.client.status()
        assert status is not None
        return {m["id"]: m["state"] for m in status["models"]}


@pytest.fixture
def engine_of(demo_model: Path, glm4_model: Path) -> Iterator:
    started: list[Engine] = []

    def start(*args: str, default: Path = demo_model) -> Engine:
        address = engine_socket()
        process = subprocess.Popen([sys.executable, "-m", "backends.chatglm.engine.server", "--address", address,
                                    "--model", str(default), "--model-id", "demo", f"--also=glm4={glm4_model}", *args],
                                   cwd=ROOT, stderr=subprocess.PIPE, text=True)
        engine = Engine(process, EngineClient(address, None, wait_seconds=30))
        started.append(engine)

        def pump() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                with engine.changed:
                    engine.log.append(line)
                    engine.changed.notify_all()
        threading.Thread(target=pump, daemon=True).start()
        engine.wait_for_log("loaded demo in")
        return engine

    yield start
    for engine in started:
        engine.process.terminate()
        engine.process.wait()


def ask(engine: Engine, model: str, max_tokens: int = 4) -> Finish:
    events = list(engine.client.generate(ChatRequest(model=model, messages=(Message("user", "hi"),),
                                                     max_tokens=max_tokens, temperature=0)))
    assert isinstance(events[-1], Finish)
    return events[-1]


def test_requests_alternating_between_two_models_are_all_answered_one_model_loaded_at_a_time(engine_of):
    engine = engine_of("--max-loaded", "1")
    assert engine.states() == {"demo": "loaded", "glm4": "unloaded"}
    for model in ("glm4", "demo", "glm4", "demo"):
        assert ask(engine, model).usage.completion_tokens == 4
        assert engine.states() == {"demo": "unloaded", "glm4": "loaded"} if model == "glm4" else \
            {"demo": "loaded", "glm4": "unloaded"}
    log = engine.wait_for_counts(**{"loaded glm4 in": 2, "unloaded glm4 (": 2, "loaded demo in": 3,
                                    "unloaded demo (": 2})
    assert "a request for glm4 waited" in log
    assert engine.process.poll() is None


def test_two_models_fit_under_a_limit_of_two_and_stay(engine_of):
    engine = engine_of("--max-loaded", "2")
    ask(engine, "glm4")
    ask(engine, "demo")
    assert engine.states() == {"demo": "loaded", "glm4": "loaded"}
    assert "unloaded" not in "".join(engine.log)


def test_an_idle_model_is_unloaded_after_its_keep_alive(engine_of):
    engine = engine_of("--max-loaded", "2", "--keep-alive", "1")
    ask(engine, "glm4")
    line = engine.wait_for_log("unloaded glm4 (idle for")
    assert float(line.split("idle for ")[1].split("s")[0]) >= 1.0
    engine.wait_for_log("unloaded demo (idle for")
    assert engine.states() == {"demo": "unloaded", "glm4": "unloaded"}
    assert ask(engine, "demo").usage.completion_tokens == 4  # loaded again by its next request


def test_requests_arriving_while_their_model_loads_wait_for_it_and_are_answered(engine_of):
    engine = engine_of("--max-loaded", "1", "--slots", "2")
    finishes: list[Finish] = []
    threads = [threading.Thread(target=lambda: finishes.append(ask(engine, "glm4"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [f.usage.completion_tokens for f in finishes] == [4, 4, 4]
    engine.wait_for_counts(**{"loaded glm4 in": 1})  # one load for the three


def test_a_model_that_cannot_be_loaded_in_time_is_a_queue_timeout_and_the_busy_one_goes_on(engine_of, slow_model):
    engine = engine_of("--max-loaded", "1", "--queue-timeout", "1", default=slow_model)
    long = engine.client.generate(ChatRequest(model="demo", messages=(Message("user", "hi"),), max_tokens=5000))
    next(long)  # the long answer is running: the one loaded model is busy
    with pytest.raises(QueueTimeout, match="waited 1s for model glm4 to be loaded"):
        ask(engine, "glm4")
    next(long)  # still going
    long.close()  # cancelled
    assert engine.states() == {"demo": "loaded", "glm4": "unloaded"}  # drained for nobody: it serves on
    assert ask(engine, "demo").usage.completion_tokens == 4
    assert ask(engine, "glm4").usage.completion_tokens == 4  # and now there is room


# -- under gunicorn --------------------------------------------------------------------------------


def models_of(base_url: str) -> dict[str, str | None]:
    listed = httpx.get(base_url + "/v1/models").json()["data"]
    return {m["id"]: (m.get("status") or {}).get("value") for m in listed}


def test_v1_models_lists_every_local_model_and_which_is_loaded(server_factory, demo_model, glm4_model):
    server = server_factory(CHATGLM_MODEL=str(demo_model), CHATGLM_MODEL_ID="demo",
                            CHATGLM_MODELS=f"glm4={glm4_model}", MAX_LOADED_MODELS="1",
                            MODEL_ALIASES="gpt-4o=glm4")
    assert models_of(server.base_url) == {"demo": "loaded", "glm4": "unloaded", "gpt-4o": "unloaded"}
    assert httpx.get(server.base_url + "/ready").status_code == 200
    for model in ("gpt-4o", "demo", "glm4"):
        answer = httpx.post(server.v1 + "/chat/completions", timeout=60, json={
            "model": model, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
    assert models_of(server.base_url) == {"demo": "unloaded", "glm4": "loaded", "gpt-4o": "loaded"}
    assert httpx.get(server.base_url + "/ready").status_code == 200  # an unloaded model is served all the same
    counted = httpx.post(server.v1 + "/tokenize", timeout=60, json={"model": "demo", "prompt": "hello"}).json()
    assert counted["count"] > 0 and models_of(server.base_url)["demo"] == "loaded"  # its tokenizer loaded it
    server.wait_for_log("unloaded glm4 (")
    server.wait_for_log("loaded glm4 in")


@pytest.mark.parametrize("entry, says", [
    ("glm4={missing}", "CHATGLM_MODELS: glm4:"),
    ("glm4={not_a_model}", "CHATGLM_MODELS: glm4:"),
    ("glm4={glm4},glm4={glm4}", "CHATGLM_MODELS: the id 'glm4' is given twice"),
    ("demo={glm4}", "CHATGLM_MODELS: the id 'demo' is also CHATGLM_MODEL's"),
    ("glm4", "CHATGLM_MODELS: 'glm4' is not id=path"),
])
def test_a_bad_models_entry_stops_startup_with_one_line(tmp_path, demo_model, glm4_model, entry, says):
    not_a_model = tmp_path / "hello.bin"
    not_a_model.write_text("hello")
    models = entry.format(missing=tmp_path / "missing.bin", not_a_model=not_a_model, glm4=glm4_model)
    env = {"CHATGLM_MODEL": str(demo_model), "CHATGLM_MODEL_ID": "demo", "CHATGLM_MODELS": models, "PORT": "0",
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", "wsgi:application"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("aigate: configuration error: " + says), lines[0]


def test_an_unloaded_model_gives_its_memory_back(engine_of, slow_model):
    """Unloading drops every reference to the model (its Pipelines unmap the file, free the KV caches): the
    engine's resident memory, as its log lines say, goes back to what it was before the load."""
    engine = engine_of("--max-loaded", "1", f"--also=endless={slow_model}")
    ask(engine, "endless")
    loaded = engine.wait_for_log("loaded endless in")
    before, after = (int(n) for n in loaded.split("memory ")[1].split(" MB")[0].split(" -> "))
    size = slow_model.stat().st_size // 2**20
    assert after - before >= size // 2, loaded  # its weights are in memory
    ask(engine, "demo")
    unloaded = engine.wait_for_log("unloaded endless (")
    held, left = (int(n) for n in unloaded.split("memory ")[1].split(" MB")[0].split(" -> "))
    assert held - left >= size // 2 and left - before < size // 4, unloaded
