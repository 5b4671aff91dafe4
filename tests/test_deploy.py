"""The deployment files, tested with the real servers: nginx and Apache (mod_proxy) in front of
gunicorn, Passenger's entry point under a plain WSGI server, and the systemd unit."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import requests

from tests.conftest import ROOT, engine_socket

DEPLOY = ROOT / "deploy"
USER = [{"role": "user", "content": "Tell me about the bridge."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}") from None
            time.sleep(0.02)


@pytest.fixture(scope="module")
def upstream(server_factory, slow_model):
    return server_factory(CHATGLM_MODEL=str(slow_model), WORKERS="2")


def nginx_config(tmp: Path, port: int, upstreams: list[str], server_options: str = "",
                 includes: tuple[str, ...] = ("aigate-proxy.conf",)) -> Path:
    """nginx on ``port`` in front of the aigate hosts ``upstreams``, with the deploy files ``includes``."""
    servers = "".join(f"server {u.removeprefix('http://')}{server_options}; " for u in upstreams)
    included = "".join(f"        include {DEPLOY}/nginx/{name};\n" for name in includes)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    upstream aigate {{ {servers}keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
{included}    }}
}}
""")
    return conf


def apache_config(tmp: Path, port: int, upstream_url: str) -> Path:
    modules = Path("/usr/lib/apache2/modules")
    loads = "\n".join(f"LoadModule {m}_module {modules}/mod_{m}.so"
                      for m in ("mpm_event", "authz_core", "proxy", "proxy_http", "headers", "setenvif", "reqtimeout"))
    conf = tmp / "httpd.conf"
    conf.write_text(f"""
{loads}
ServerName localhost
ServerRoot {tmp}
PidFile {tmp}/httpd.pid
ErrorLog {tmp}/error.log
Mutex file:{tmp}
Listen 127.0.0.1:{port}
User www-data
Group www-data
Define AIGATE_UPSTREAM {upstream_url.removeprefix("http://")}
Include {DEPLOY}/apache/aigate-proxy.conf
""")
    return conf


@pytest.fixture(scope="module", params=["nginx", "apache"])
def proxy(request, upstream, tmp_path_factory):
    binary = {"nginx": "/usr/sbin/nginx", "apache": "/usr/sbin/apache2"}[request.param]
    if not Path(binary).exists():
        pytest.skip(f"{request.param} is not installed (make test installs it when run as root)")
    tmp = tmp_path_factory.mktemp(request.param)
    port = free_port()
    if request.param == "nginx":
        conf = nginx_config(tmp, port, [upstream.base_url])
        command = [binary, "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"]
    else:
        conf = apache_config(tmp, port, upstream.base_url)
        command = [binary, "-f", str(conf), "-DFOREGROUND"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, process)
    except RuntimeError:
        process.kill()
        log = Path(tmp, "error.log")
        raise RuntimeError(process.communicate()[0] + (log.read_text() if log.exists() else "")) from None
    yield f"http://127.0.0.1:{port}"
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)


def timed_stream(base_url: str) -> tuple[float, float, str]:
    """Seconds to the first content chunk, seconds to the end, and the text. A light client
    (no SDK parsing): on two cores a busy client slows ggml's spinning threads down."""
    body = {"model": "endless", "messages": USER, "temperature": 0, "max_tokens": 400, "stream": True}
    started = time.monotonic()
    first = None
    parts = []
    with requests.post(base_url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            content = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if content:
                first = first or time.monotonic() - started
                parts.append(content)
    return first or 0.0, time.monotonic() - started, "".join(parts)


def test_streams_pass_through_the_proxy_unbuffered(proxy, upstream):
    _, _, direct = timed_stream(upstream.base_url)
    first, total, proxied = timed_stream(proxy)
    assert proxied == direct
    assert first < total / 4, f"first chunk at {first:.2f}s of {total:.2f}s: the proxy buffered the stream"


def test_a_chunked_body_reaches_aigate_whole_through_the_proxy(proxy):
    """The proxies read a chunked body whole before passing it on (nginx's request buffering,
    Apache's proxy-sendcl): aigate gets the request at once."""
    body = json.dumps({"model": "endless", "messages": USER, "max_tokens": 2}).encode()
    r = requests.post(proxy + "/v1/chat/completions", data=iter([body[:10], body[10:]]), timeout=30,
                      headers={"Content-Type": "application/json"})  # a generator: sent chunked
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_proxy_keeps_metrics_private_and_passes_the_rest(proxy):
    assert requests.get(proxy + "/metrics", timeout=10).status_code in (403, 404)
    assert requests.get(proxy + "/ready", timeout=10).status_code == 200
    r = requests.get(proxy + "/v1/models", timeout=10)
    assert r.status_code == 200 and r.headers["x-request-id"]


def test_passenger_entry_point_serves_a_stream(tmp_path, demo_model):
    """passenger_wsgi.py under a plain, single-threaded WSGI server (no gevent), as Passenger runs it."""
    port = free_port()
    code = ("import sys; from wsgiref.simple_server import make_server; import passenger_wsgi; "
            f"server = make_server('127.0.0.1', {port}, passenger_wsgi.application); "
            "print('serving', flush=True); server.serve_forever()")
    env = {"CHATGLM_MODEL": str(demo_model), "ENGINE_SOCKET": engine_socket(), "PATH": "/usr/bin:/bin"}
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:  # log lines first, then the server's own
            if line.startswith("serving"):
                break
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        chunks = list(client.chat.completions.create(model="demo", messages=USER, max_tokens=20, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage.completion_tokens >= 1
        assert requests.get(f"http://127.0.0.1:{port}/ready", timeout=10).status_code == 200
    finally:
        process.kill()
        process.wait()


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The unit as shipped, with its paths pointed at this checkout so that they exist here.
    unit = (DEPLOY / "aigate.service").read_text()
    unit = unit.replace("/opt/aigate/.venv/bin/gunicorn", str(Path(sys.executable).with_name("gunicorn")))
    unit = unit.replace("/opt/aigate", str(ROOT)).replace("User=aigate", "User=root").replace("Group=aigate",
                                                                                                 "Group=root")
    path = tmp_path / "aigate.service"
    path.write_text(unit)
    result = subprocess.run([analyze, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if "aigate.service" in line]
    assert result.returncode == 0 and not problems, result.stderr
