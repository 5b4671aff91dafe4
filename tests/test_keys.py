"""API keys in-process: the keys file, models per key, requests and tokens per minute, secrets kept."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from app import check_config, create_app, load_backends
from compat.errors import APIError
from config.settings import ApiKey, ConfigError, key_name, load_settings
from tests.conftest import engine_socket
from web.auth import authenticate

KEYS_FILE = """
[keys.alice]
key = "sk-alice-secret"
models = ["demo"]
requests_per_minute = 3

[keys.bob]
key = "sk-bob-secret"
tokens_per_minute = 12
"""


def keys_settings(tmp_path: Path, text: str = KEYS_FILE, **env: str):
    keys = tmp_path / "keys.toml"
    keys.write_text(text)
    keys.chmod(0o600)
    return load_settings({"API_KEYS_FILE": str(keys), **env}, dotenv=None)


def test_the_keys_file_and_api_keys_are_read_with_default_limits(tmp_path):
    s = keys_settings(tmp_path, API_KEYS="sk-plain", RATE_LIMIT_RPM="7", RATE_LIMIT_TPM="900")
    plain, alice, bob = s.api_keys
    assert plain == ApiKey(key_name("sk-plain"), "sk-plain", (), 7, 900)
    assert alice == ApiKey("alice", "sk-alice-secret", ("demo",), 3, 900)  # its own rpm, the default tpm
    assert bob == ApiKey("bob", "sk-bob-secret", (), 7, 12)
    assert "secret" not in repr(s) and "sk-plain" not in repr(s)  # a logged settings object gives nothing away
    assert key_name("sk-plain").startswith("key-") and "sk-plain" not in key_name("sk-plain")


def test_a_keys_file_others_can_read_is_warned_about(tmp_path, caplog):
    keys_settings(tmp_path)
    assert "can be read by other users" not in caplog.text
    (tmp_path / "keys.toml").chmod(0o644)
    load_settings({"API_KEYS_FILE": str(tmp_path / "keys.toml")}, dotenv=None)
    assert "can be read by other users: chmod 600 it" in caplog.text


@pytest.mark.parametrize("text, message", [
    ("[keys.a]\nkey = 'x'\nrpm = 3", "unknown field 'rpm'"),
    ("[keys.a]\nkey = 'x'\nrequests_per_minute = -1", "requests_per_minute must be a whole number >= 0"),
    ("[keys.a]\nkey = 'x'\nmodels = 'demo'", "models must be list"),
    ("[keys.a]\nmodels = ['demo']", "[keys.a]: key is missing"),
    ("[keys.a]\nkey = 'x'\n[keys.b]\nkey = 'x'", "the same key is listed twice"),
    ("[keys]\n", "has no [keys.<name>] tables"),
    ("[keys.a\n", "is not valid TOML"),
])
def test_a_bad_keys_file_is_refused_naming_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match="API_KEYS_FILE") as err:
        keys_settings(tmp_path, text)
    assert message in str(err.value)


def test_a_key_naming_an_unknown_model_stops_start_up(tmp_path, demo_model):
    s = keys_settings(tmp_path, "[keys.a]\nkey = 'x'\nmodels = ['gpt-5']", CHATGLM_MODEL=str(demo_model))
    with pytest.raises(ConfigError, match=r"\[keys.a\] models: no configured model or alias is called 'gpt-5'"):
        check_config(s)


def test_a_storage_uri_that_is_not_memory_or_redis_is_refused():
    with pytest.raises(ConfigError, match="RATELIMIT_STORAGE_URI='host:1'"):
        load_settings({"RATELIMIT_STORAGE_URI": "memcached://user:pw@host:1"}, dotenv=None)
    with pytest.raises(ConfigError, match="Port could not be cast") as err:  # at start, not in every worker
        load_settings({"RATELIMIT_STORAGE_URI": "redis://:hunter2@host:abc"}, dotenv=None)
    assert "hunter2" not in str(err.value)


def test_no_secret_setting_shows_in_a_printed_settings_object():
    s = load_settings({"CLOUDFLARE_ACCOUNT_ID": "a", "CLOUDFLARE_API_TOKEN": "cf-SECRET", "METRICS_TOKEN": "m-SECRET",
                       "RATELIMIT_STORAGE_URI": "redis://:r-SECRET@127.0.0.1:6379", "API_KEYS": "k-SECRET"},
                      dotenv=None)
    assert "SECRET" not in repr(s)


def make_client(tmp_path: Path, demo_model: Path, **env: str):
    s = keys_settings(tmp_path, CHATGLM_MODEL=str(demo_model), MODEL_ALIASES="gpt-4o=demo", **env)
    app = create_app(dataclasses.replace(s, chatglm_model_id="demo", engine_socket=engine_socket()))
    load_backends(app)
    return app.test_client()


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def chat(client, secret: str, model: str = "demo", max_tokens: int = 4):
    r = client.post("/v1/chat/completions", headers=bearer(secret), json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
        "temperature": 0})
    r.close()  # the tokens are charged when the answer is closed
    return r


def test_the_key_is_read_from_a_bearer_header_or_else_x_api_key():
    """Anthropic's SDKs and Claude Code send `x-api-key`; a bearer Authorization header wins over it."""
    keys = (ApiKey("alice", "sk-alice"), ApiKey("bob", "sk-bob"))
    assert authenticate("Bearer sk-alice", keys).name == "alice"
    assert authenticate(None, keys, "sk-bob").name == "bob"
    assert authenticate("Bearer sk-alice", keys, "sk-bob").name == "alice"
    assert authenticate("Basic dXNlcg==", keys, "sk-bob").name == "bob"  # a proxy's own header is not the key
    for header, api_key in (("Bearer sk-wrong", "sk-bob"), (None, "sk-wrong"), (None, None), (None, "")):
        with pytest.raises(APIError) as refused:
            authenticate(header, keys, api_key)
        assert refused.value.status == 401
    assert authenticate(None, (), "anything") is None  # no keys configured: nothing to check


def test_a_key_sees_and_uses_only_its_models(tmp_path, demo_model):
    client = make_client(tmp_path, demo_model)
    alice = [m["id"] for m in client.get("/v1/models", headers=bearer("sk-alice-secret")).json["data"]]
    bob = [m["id"] for m in client.get("/v1/models", headers=bearer("sk-bob-secret")).json["data"]]
    assert alice == ["demo", "gpt-4o"] and bob == ["demo", "gpt-4o"]  # the alias points at an allowed model

    s = keys_settings(tmp_path, "[keys.carol]\nkey = 'sk-carol'\nmodels = ['gpt-4o']", CHATGLM_MODEL=str(demo_model),
                      MODEL_ALIASES="gpt-4o=demo")
    app = create_app(dataclasses.replace(s, chatglm_model_id="demo", engine_socket=engine_socket()))
    load_backends(app)
    client = app.test_client()
    assert [m["id"] for m in client.get("/v1/models", headers=bearer("sk-carol")).json["data"]] == ["gpt-4o"]
    assert client.get("/v1/models/demo", headers=bearer("sk-carol")).status_code == 404
    refused = chat(client, "sk-carol", model="demo")
    assert refused.status_code == 404 and refused.json["error"]["code"] == "model_not_found"
    assert chat(client, "sk-carol", model="gpt-4o").status_code == 200


def test_requests_per_minute_answer_429_with_retry_after(tmp_path, demo_model):
    client = make_client(tmp_path, demo_model)
    seen = [client.get("/v1/models", headers=bearer("sk-alice-secret")) for _ in range(4)]
    assert [r.status_code for r in seen] == [200, 200, 200, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in seen[:3]] == ["2", "1", "0"]
    error = seen[3].json["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "alice" in error["message"] and "limit 3" in error["message"]
    assert 1 <= int(seen[3].headers["Retry-After"]) <= 60
    assert client.get("/v1/models", headers=bearer("sk-bob-secret")).status_code == 200  # bob counts apart
    assert client.get("/health").status_code == 200  # only /v1 is limited


def test_tokens_per_minute_are_charged_after_the_answer(tmp_path, demo_model):
    client = make_client(tmp_path, demo_model)
    # It reserves its prompt as estimated ("hi": 1 token, and 7 of the chat template's) and max_tokens (4): 12, all
    # of bob's budget. It spends 10 (6 of prompt on the demo model), and what is left holds no second reservation.
    first = chat(client, "sk-bob-secret")
    assert first.status_code == 200 and 0 < 12 - first.json["usage"]["total_tokens"] < 12
    refused = chat(client, "sk-bob-secret")
    assert refused.status_code == 429, refused.json
    assert refused.json["error"]["type"] == "tokens" and refused.json["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert chat(client, "sk-alice-secret").status_code == 200


def open_stream(tmp_path: Path, slow_model: Path, tokens_per_minute: int, max_tokens: int):
    """An app on the endless model with one key, 'sk-t', and a stream of its started on it."""
    s = keys_settings(tmp_path, f"[keys.t]\nkey = 'sk-t'\ntokens_per_minute = {tokens_per_minute}",
                      CHATGLM_MODEL=str(slow_model))
    app = create_app(dataclasses.replace(s, engine_socket=engine_socket()))
    load_backends(app)
    client = app.test_client()
    body = {"model": "endless", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": True}
    stream = client.post("/v1/chat/completions", headers=bearer("sk-t"), json=body, buffered=False)
    return client, stream, iter(stream.response)


def test_a_stream_cut_short_is_charged_for_what_it_sent(tmp_path, slow_model):
    client, stream, chunks = open_stream(tmp_path, slow_model, tokens_per_minute=517, max_tokens=500)
    sent = [next(chunks) for _ in range(6)]  # the role, then five pieces of text
    assert all(c.startswith(b"data: {") for c in sent)
    stream.close()  # the client leaves long before the end: no usage ever comes
    # What it sent still counts (at least 5 tokens), so 513 more (a prompt of 8 as estimated, and 505) do not fit in
    # the 517, which they would alone.
    refused = chat(client, "sk-t", model="endless", max_tokens=505)
    assert refused.status_code == 429 and refused.json["error"]["type"] == "tokens"


def test_a_running_answer_holds_its_max_tokens_until_it_ends(tmp_path, slow_model):
    client, stream, chunks = open_stream(tmp_path, slow_model, tokens_per_minute=220, max_tokens=200)
    assert next(chunks).startswith(b"data: {")
    # 208 tokens (8 of prompt as estimated, 200) are spoken for while it runs: a second answer of 30 does not fit
    # in what is left...
    refused = chat(client, "sk-t", model="endless", max_tokens=30)
    assert refused.status_code == 429 and refused.json["error"]["type"] == "tokens"
    stream.close()  # ...until it ends early: then only what it used counts, and there is room again
    assert chat(client, "sk-t", model="endless", max_tokens=30).status_code == 200


def test_settling_a_reservation_never_refunds_into_a_new_minute():
    from limits import RateLimitItemPerMinute
    from limits.storage import MemoryStorage

    from web.rate_limits import TokenBudget

    storage, item = MemoryStorage(), RateLimitItemPerMinute(100)
    budget, key = TokenBudget(storage), item.key_for("tokens", "k")
    budget.charge(item, "k", 90)  # reserved when the answer started
    budget.charge(item, "k", 20 - 90)  # it used 20
    assert storage.get(key) == 20
    budget.charge(item, "k", 90)
    storage.clear(key)  # the minute turns while the answer runs
    budget.charge(item, "k", 20 - 90)
    assert storage.get(key) == 0  # not -70: the new minute keeps its whole budget


def test_without_keys_the_default_limits_apply_per_client_address(tmp_path, demo_model):
    s = load_settings({"CHATGLM_MODEL": str(demo_model), "RATE_LIMIT_RPM": "2"}, dotenv=None)
    client = create_app(dataclasses.replace(s, engine_socket=engine_socket())).test_client()
    other = {"REMOTE_ADDR": "127.0.0.2"}
    codes = [client.get("/v1/models").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert client.get("/v1/models", environ_base=other).status_code == 200


@pytest.mark.parametrize("store", ["refuses connections", "accepts and never answers"])
def test_a_dead_limit_store_serves_rather_than_refuses(tmp_path, demo_model, caplog, store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        if store == "accepts and never answers":  # the kernel completes the handshake; no one reads
            s.listen()
        port = s.getsockname()[1]
        client = make_client(tmp_path, demo_model, RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{port}")
        codes: list[int] = []
        seconds: list[float] = []

        def traffic() -> None:  # bob has a token budget and no request limit
            for _ in range(4):
                started = time.monotonic()
                codes.append(client.get("/v1/models", headers=bearer("sk-bob-secret")).status_code)
                seconds.append(time.monotonic() - started)

        worker = threading.Thread(target=traffic, daemon=True)
        worker.start()
        worker.join(timeout=30)  # a hung store must not hang the requests
    assert codes == [200, 200, 200, 200]
    assert "rate-limit storage failed" in caplog.text
    assert max(seconds[1:]) < 0.5, seconds  # after the first failure, no request waits on the store


def test_keys_are_never_logged_or_echoed(tmp_path, demo_model, caplog):
    caplog.set_level(logging.INFO)
    client = make_client(tmp_path, demo_model, LOG_PROMPTS="1")
    answers = [chat(client, "sk-alice-secret"), chat(client, "sk-bob-secret", model="gpt-5"),
               chat(client, "sk-alice-secret-but-wrong"), chat(client, "sk-bob-secret"), chat(client, "sk-bob-secret")]
    assert [r.status_code for r in answers] == [200, 404, 401, 200, 429]
    seen = caplog.text + "".join(r.get_data(as_text=True) + str(r.headers) for r in answers)
    assert "key=alice" in caplog.text and "key=bob" in caplog.text  # the names are what the log shows
    assert "sk-alice" not in seen and "sk-bob" not in seen
