"""The local engine on a machine shared with other Unix users (shared hosting). A second local user,
made with useradd, plays the attacker for real: it can neither reach the engine nor stand in for it
when it is down, nor wear it down with connections. aigate's own user gets bounds too: junk lines and
an endless handover frame cost one log line each, connections past the line are refused without a
thread, running out of descriptors does not end the engine, and a reader that falls behind lets go
of its slot."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import requests

from backends.base import ChatRequest, Message
from backends.chatglm.demo_model import write_demo_model
from backends.chatglm.engine import protocol
from backends.chatglm.engine.address import UnsafeAddress, private_directory, problem
from backends.chatglm.engine.client import EngineClient, connect
from tests.conftest import ROOT, engine_socket

STRANGER = "aigate-stranger"
# The stranger runs the standard library only, with a system Python every user may run.
PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.isfile(p)
               and os.stat(os.path.realpath(p)).st_mode & stat.S_IXOTH), None)


# -- the stranger -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stranger() -> tuple[int, int]:
    """A second local user, made once and left in place (a system user: no home, no login shell);
    other test runs on this machine may be using it at the same time."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to make a second local user (useradd) and act as it")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not available to make a second local user")
    if PYTHON is None:
        pytest.skip("no system Python that another user may run")
    try:
        entry = pwd.getpwnam(STRANGER)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", STRANGER],
                              capture_output=True, text=True)
        try:
            entry = pwd.getpwnam(STRANGER)  # or made by another run meanwhile
        except KeyError:
            pytest.skip(f"useradd could not make {STRANGER}: {made.stderr.strip()}")
    return entry.pw_uid, entry.pw_gid


def as_stranger(stranger: tuple[int, int], code: str, *args: str) -> subprocess.Popen:
    uid, gid = stranger
    assert PYTHON is not None
    return subprocess.Popen([PYTHON, "-c", code, *args], user=uid, group=gid, extra_groups=[], cwd="/",
                            env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_as_stranger(stranger: tuple[int, int], code: str, *args: str) -> str:
    process = as_stranger(stranger, code, *args)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return out.strip()


TRY_CONNECT = """
import socket, sys
address = sys.argv[1]
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect("\\0" + address[1:] if address.startswith("@") else address)
except OSError as exc:
    print(type(exc).__name__)
    sys.exit()
try:
    sock.sendall(b'{"op":"status"}\\n')
except OSError:
    pass  # closed already: what it says is read next
sock.settimeout(5)
try:
    answer = sock.recv(65536)
except ConnectionResetError:  # closed with the request unread
    answer = b""
print("answered", answer) if answer else print("closed unanswered")
"""

TRY_BIND = """
import os, socket, sys
address = sys.argv[1]
for attempt in ("unlink", "bind"):
    try:
        os.unlink(address) if attempt == "unlink" else socket.socket(socket.AF_UNIX).bind(address)
        print(attempt, "done")
    except OSError as exc:
        print(attempt, type(exc).__name__)
"""

# Plays the engine at an abstract address as soon as the name is free: answers a status as a loaded
# engine would, a request with a text piece offering a handover, and keeps any descriptor it is
# handed. Stops when its stdin closes and says what it got.
IMPOSTOR = """
import json, select, socket, sys, time
name = "\\0" + sys.argv[1][1:]
listener = socket.socket(socket.AF_UNIX)
deadline = time.monotonic() + 20
while True:
    try:
        listener.bind(name)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("never bound")
        time.sleep(0.002)
listener.listen(64)
print("bound", flush=True)
got = {"connections": 0, "bytes": 0, "fds": 0}
while True:
    ready, _, _ = select.select([listener, sys.stdin], [], [])
    if sys.stdin in ready:
        break
    conn, _ = listener.accept()
    got["connections"] += 1
    conn.settimeout(1)
    try:
        for _ in range(3):
            data, fds, _, _ = socket.recv_fds(conn, 65536, 4)
            got["bytes"] += len(data)
            got["fds"] += len(fds)
            if not data:
                break
            if b'"status"' in data:
                conn.sendall(b'{"loaded":true,"error":null,"running":0,"waiting":0,"pid":1,"handovers":0}\\n')
            else:
                conn.sendall(b'{"text":"IMPOSTOR","handover":true}\\n')
    except OSError:
        pass
    conn.close()
print(json.dumps(got), flush=True)
"""

FLOOD = """
import socket, sys, time
address, count = sys.argv[1], int(sys.argv[2])
held, closed_at_once = [], 0
for _ in range(count):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect("\\0" + address[1:])
    held.append(sock)
print("open", len(held), flush=True)
sys.stdin.read()
deadline = time.monotonic() + 3
for sock in held:
    sock.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        closed_at_once += sock.recv(1) == b""
    except OSError:
        pass
print("closed by the engine", closed_at_once, flush=True)
"""


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory open to every user, as /tmp is (the stranger can reach into it)."""
    path = Path(tempfile.mkdtemp(prefix="aigate-shared-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ready(server) -> requests.Response:
    return requests.get(server.base_url + "/ready", timeout=10)


def wait_until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def engine_pid(address: str) -> int:
    status = EngineClient(address, None, 0).status()
    assert status is not None and status["pid"]
    return status["pid"]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def threads_of(pid: int) -> int:
    return int(re.search(r"Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def chat(server, **extra) -> requests.Response:
    return requests.post(server.v1 + "/chat/completions", timeout=60, json={
        "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra})


# -- another user, against the default address ------------------------------------------------------------


def test_another_user_can_neither_reach_nor_replace_the_engine(stranger, server_factory, demo_model, shared_tmp):
    server = server_factory(CHATGLM_MODEL=str(demo_model), ENGINE_SOCKET="", TMPDIR=str(shared_tmp))
    address = re.search(r"engine: listening at (\S+)", server.wait_for_log("engine: listening at")).group(1)
    assert address.startswith(f"{shared_tmp}/aigate-{os.getuid()}/")  # the default: a path, not a name
    directory = Path(address).parent
    assert stat.S_IMODE(directory.lstat().st_mode) == 0o700 and directory.lstat().st_uid == os.getuid()
    assert run_as_stranger(stranger, TRY_CONNECT, address) == "PermissionError"

    old = engine_pid(address)
    os.kill(old, signal.SIGKILL)  # down: its socket file stays, and the stranger tries to take its place
    assert run_as_stranger(stranger, TRY_BIND, address).splitlines() == ["unlink PermissionError",
                                                                         "bind PermissionError"]
    wait_until(lambda: ready(server).status_code == 200)
    new = engine_pid(address)
    assert new != old and parent_of(new) == server.process.pid  # the keeper's own
    assert chat(server).status_code == 200


def test_a_directory_another_user_made_first_stops_the_start_with_one_clear_line(stranger, server_factory,
                                                                                demo_model, shared_tmp):
    squatted = shared_tmp / f"aigate-{os.getuid()}"
    run_as_stranger(stranger, "import os, sys; os.mkdir(sys.argv[1], 0o777)", str(squatted))
    with pytest.raises(RuntimeError) as failed:
        server_factory(CHATGLM_MODEL=str(demo_model), ENGINE_SOCKET="", TMPDIR=str(shared_tmp))
    assert (f"configuration error: ENGINE_SOCKET: the engine's socket directory {squatted} belongs to uid "
            f"{stranger[0]}") in str(failed.value)


def test_the_socket_directory_must_be_this_users_own_and_closed(tmp_path, stranger):
    address = str(tmp_path / "run" / "engine.sock")
    assert problem(address) is None  # missing: made at start
    private_directory(address)
    assert stat.S_IMODE(os.lstat(tmp_path / "run").st_mode) == 0o700
    (tmp_path / "run").chmod(0o755)
    with pytest.raises(UnsafeAddress, match="open to other users"):
        private_directory(address)
    os.chown(tmp_path / "run", *stranger)
    (tmp_path / "run").chmod(0o700)
    with pytest.raises(UnsafeAddress, match=f"belongs to uid {stranger[0]}"):
        private_directory(address)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    assert "symbolic link" in (problem(str(tmp_path / "link" / "engine.sock")) or "")
    assert "longer than" in (problem("/" + "x" * 120) or "")


# -- another user, against an abstract address (ENGINE_SOCKET=@name: no owner, anyone may bind it) ---------


@pytest.fixture(scope="module")
def abstract_server(server_factory, demo_model):
    address = "@" + engine_socket().rsplit("/", 1)[1] + "-abstract"
    # A request waits max(QUEUE_TIMEOUT, 5) seconds for an engine it may talk to.
    return server_factory(CHATGLM_MODEL=str(demo_model), ENGINE_SOCKET=address, QUEUE_TIMEOUT="1")


def test_a_stranger_that_takes_the_address_gets_no_request_and_no_client(stranger, abstract_server):
    server, address = abstract_server, abstract_server.engine_socket
    assert run_as_stranger(stranger, TRY_CONNECT, address) == "closed unanswered"
    old = engine_pid(address)
    impostor: subprocess.Popen | None = None
    os.kill(server.process.pid, signal.SIGSTOP)  # the keeper holds still while the stranger takes the name
    try:
        os.kill(old, signal.SIGKILL)
        impostor = as_stranger(stranger, IMPOSTOR, address)
        assert impostor.stdout is not None and impostor.stdout.readline().strip() == "bound"
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    try:
        not_ready = ready(server)
        assert not_ready.status_code == 503
        assert "another user's process holds its address" in not_ready.json()["backends"]["chatglm"]
        # A stream would hand the client's socket over after the first piece: it gets no further than a 503.
        refused = chat(server, stream=True)
        assert refused.status_code == 503 and "another user's process" in refused.json()["error"]["message"]
        server.wait_for_log(f"cannot listen: the local engine's address {address} is held by process "
                            f"{impostor.pid} of uid {stranger[0]}")
    finally:
        out, err = impostor.communicate("", timeout=30)  # it lets go of the name
    got = json.loads(out.splitlines()[-1])
    assert got["connections"] >= 2 and got["bytes"] == 0 and got["fds"] == 0, (got, err)
    wait_until(lambda: ready(server).status_code == 200)  # the keeper's engine is back
    new = engine_pid(address)
    assert new != old and parent_of(new) == server.process.pid
    assert chat(server).status_code == 200


def test_a_stranger_cannot_wear_the_engine_down_with_connections(stranger, abstract_server):
    server, address = abstract_server, abstract_server.engine_socket
    wait_until(lambda: ready(server).status_code == 200)
    pid = engine_pid(address)
    threads = threads_of(pid)
    flood = as_stranger(stranger, FLOOD, address, "400")
    assert flood.stdout is not None and flood.stdout.readline().strip() == "open 400"
    try:
        assert chat(server).status_code == 200  # served meanwhile
        assert threads_of(pid) <= threads + 1
    finally:
        out, err = flood.communicate("", timeout=60)
    assert "closed by the engine 400" in out, err
    assert engine_pid(address) == pid
    refusals = [line for line in server.log if "refused connections from another user's processes" in line]
    assert 1 <= len(refusals) <= 3


# -- aigate's own user: bounds ---------------------------------------------------------------------------


@contextmanager
def bare_engine(model: Path, *args: str, files: int = 0) -> Iterator[tuple[subprocess.Popen, str, list[str]]]:
    """An engine process on its own, its log lines collected."""
    address = engine_socket()
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))) if files else None
    process = subprocess.Popen([sys.executable, "-m", "backends.chatglm.engine.server", "--address", address, "--model",
                                str(model), *args], cwd=ROOT, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    log: list[str] = []
    assert process.stderr is not None
    reader = threading.Thread(target=lambda: log.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        wait_until(lambda: (status := EngineClient(address, None, 0).status()) is not None and status["loaded"]
                   or process.poll() is not None)
        assert process.poll() is None, "".join(log)
        yield process, address, log
    finally:
        process.terminate()
        process.wait()
        reader.join(5)


@pytest.fixture(scope="module")
def endless_demo(models_dir) -> Path:
    return write_demo_model(models_dir / "shared-endless.bin", eos_every=0)


def status_of(address: str) -> dict | None:
    return EngineClient(address, None, 0).status()


def test_junk_lines_cost_one_log_line_each_and_no_traceback(demo_model):
    junk = [b"not json\n", b"[1, 2]\n", b'{"op": "launch"}\n', b'{"op": "generate", "request": {"messages": 5}}\n',
            b'{"op": "generate", "request": {"model": "x", "messages": [{"role": 1, "content": []}], "tools": [],'
            b' "stop": []}}\n', b"[" * 100_000 + b"\n", b"\xff\xfe\n", b'{"op": "status"}\n{"op": "status"}\n']
    with bare_engine(demo_model) as (process, address, log):
        before = len(log)
        for line in junk:
            with connect(address, timeout=10) as sock:
                sock.sendall(line)
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(65536) == b""  # closed, unanswered
        assert status_of(address)["loaded"] and process.poll() is None
        wait_until(lambda: sum("closed an engine connection that sent" in line for line in log) == len(junk))
        assert len(log) - before == len(junk), "".join(log[before:])
    assert not any("Traceback" in line for line in log)


def test_a_handover_frame_without_end_is_cut_at_its_bound(endless_demo):
    request = ChatRequest(model="x", messages=(Message("user", "go"),), max_tokens=500, temperature=0)
    with bare_engine(endless_demo) as (process, address, log), ExitStack() as stack:
        sock = stack.enter_context(connect(address, timeout=10))
        mine, theirs = (stack.enter_context(s) for s in socket.socketpair())
        sock.sendall(protocol.encode(protocol.generate_request(request, handover=True)))
        assert protocol.decode(sock.makefile("rb").readline())["handover"] is True
        socket.send_fds(sock, [protocol.HANDOVER], [theirs.fileno()])
        sent, started = 0, time.monotonic()
        try:
            while sent < 16 * 1024 * 1024 and time.monotonic() - started < 10:
                sent += sock.send(b"x" * 65536)  # no newline, ever
        except OSError:  # the engine closed: no more is read
            pass
        assert sent < 4 * 1024 * 1024, "the engine went on reading"
        assert status_of(address)["running"] == 0 and process.poll() is None
        wait_until(lambda: any("a line longer than 65536 bytes" in line for line in log), timeout=10)


def test_connections_past_the_line_are_refused_at_once_without_a_thread(demo_model):
    with bare_engine(demo_model, "--slots", "1", "--max-queue", "2") as (process, address, log), ExitStack() as stack:
        threads = threads_of(process.pid)
        cap = 1 + 2 + 32
        held = [stack.enter_context(connect(address, timeout=10)) for _ in range(cap + 20)]
        refused = 0
        for sock in held[cap:]:
            answer = sock.makefile("rb").readline()
            refused += protocol.decode(answer)["error"] == "QueueFull"
        assert refused == 20
        assert threads_of(process.pid) <= threads + cap
        for sock in held:
            sock.close()
        wait_until(lambda: (status := status_of(address)) is not None and "loaded" in status)


def test_out_of_descriptors_the_engine_waits_and_goes_on(demo_model):
    with bare_engine(demo_model, files=32) as (process, address, log), ExitStack() as stack:
        held = [stack.enter_context(connect(address, timeout=10)) for _ in range(40)]  # past its 32 descriptors
        wait_until(lambda: any("accepting a connection failed" in line for line in log), timeout=10)
        assert process.poll() is None
        for sock in held:
            sock.close()
        wait_until(lambda: (status := status_of(address)) is not None and status["loaded"])
        assert process.poll() is None


def test_a_reader_that_acknowledges_slowly_lets_go_of_its_slot(endless_demo):
    """Each acknowledgement comes 0.8 s late, within the 1 s a single wait may take: after a few the
    reader is 1 s behind the model (its steps refill what the reader takes, up to 1 s), and the
    generation ends there."""
    request = ChatRequest(model="x", messages=(Message("user", "go"),), max_tokens=5000, temperature=0)
    with bare_engine(endless_demo, "--send-timeout", "1") as (process, address, log), connect(address) as sock:
        sock.sendall(protocol.encode(protocol.generate_request(request)))
        lines = sock.makefile("rb")
        events = 0
        while "text" in (message := protocol.decode(lines.readline())) and events < 20:
            events += 1
            time.sleep(0.8)
            try:
                sock.sendall(protocol.ACK)
            except BrokenPipeError:  # the engine has let go: its last word is read next
                pass
        assert message == {"written": "", "deltas": 0, "client": "client_too_slow"}
        assert events < 20
        wait_until(lambda: status_of(address)["running"] == 0, timeout=5)


def test_a_removed_socket_makes_the_engine_exit_to_be_made_again(demo_model):
    with bare_engine(demo_model) as (process, address, log):
        os.unlink(address)
        assert process.wait(timeout=10) == 0
        assert any("was removed or replaced" in line for line in log)

