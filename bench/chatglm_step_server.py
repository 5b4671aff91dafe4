"""Benchmark 13's chatglm.cpp contender: the model in a process of its own behind the leanest HTTP server we could
write, shaped like llama.cpp's /completion (token ids in, a stream of token ids out, greedy). Sequences that run at
the same time decode together: one `model.step` a token for all of them (chatglm-cpp built with
patches/chatglm-cpp-0.4.2-batch.patch). Without `step` (a build before it) one sequence at a time, by
generate_next_token.

    python bench/chatglm_step_server.py PORT MODEL [SLOTS] [CONTEXT]
"""

from __future__ import annotations

import json
import queue
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

import chatglm_cpp

C: Any = chatglm_cpp._C


@dataclass
class Sequence:
    conn: socket.socket
    prompt: list[int]
    left: int  # tokens still to generate
    slot: int = -1
    pos: int = 0  # tokens in its cache
    last: int = -1  # the token to evaluate next


def read_request(conn: socket.socket) -> dict[str, Any] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        block = conn.recv(65536)
        if not block:
            return None
        data += block
    head, _, body = data.partition(b"\r\n\r\n")
    if head.startswith(b"GET"):  # readiness
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        return None
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += conn.recv(65536)
    request: dict[str, Any] = json.loads(body)
    return request


def send(seq: Sequence, token: int) -> None:
    seq.conn.sendall(b'data: {"tokens":[%d]}\n\n' % token)


def finish(seq: Sequence) -> None:
    try:
        seq.conn.sendall(b"data: [DONE]\n\n")
    finally:
        seq.conn.close()


def stepper(model: Any, arrivals: queue.Queue[Sequence], slots: int) -> None:
    greedy = C.GenerationConfig(do_sample=False)
    running: list[Sequence] = []
    free = list(range(slots))
    while True:
        while free and (not running or not arrivals.empty()):
            seq = arrivals.get()  # blocks only while nothing runs
            seq.slot = free.pop(0)
            running.append(seq)
        entries = [C.StepEntry(s.slot, s.prompt if s.pos == 0 else [s.last], s.pos, s.pos, greedy) for s in running]
        tokens = model.step(entries)
        for seq, token in zip(list(running), tokens, strict=True):
            seq.pos += len(seq.prompt) if seq.pos == 0 else 1
            seq.last = token
            seq.left -= 1
            send(seq, token)
            if seq.left <= 0:
                finish(seq)
                running.remove(seq)
                free.append(seq.slot)


def serial(model: Any, arrivals: queue.Queue[Sequence], context: int) -> None:
    greedy = C.GenerationConfig(do_sample=False)
    while True:
        seq = arrivals.get()
        ids = list(seq.prompt)
        token = model.generate_next_token(ids, None, greedy, 0, context)
        for _ in range(seq.left - 1):
            send(seq, token)
            ids.append(token)
            token = model.generate_next_token(ids, None, greedy, len(ids) - 1, context)
        send(seq, token)
        finish(seq)


def warm_up(model: Any, batched: bool, context: int) -> None:
    """A first graph of ~2·sqrt(context) rows, as aigate's engine makes (chatglm.cpp sizes its buffers by it)."""
    warm = [10 + i % 500 for i in range(2 * int(context**0.5) + 2)]
    if batched:
        model.step([C.StepEntry(0, warm, 0, 0, C.GenerationConfig(do_sample=False))])
    else:
        model.generate_next_token(warm, None, C.GenerationConfig(do_sample=False), 0, context)


def main() -> None:
    port, path = int(sys.argv[1]), sys.argv[2]
    slots = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    context = int(sys.argv[4]) if len(sys.argv) > 4 else 2048
    batched = hasattr(C.BaseModelForCausalLM, "step")
    kwargs = {"num_slots": slots} if batched else {}
    model = chatglm_cpp.Pipeline(path, max_length=context, **kwargs).model
    arrivals: queue.Queue[Sequence] = queue.Queue()
    target, args = (stepper, (model, arrivals, slots)) if batched else (serial, (model, arrivals, context))
    ready = threading.Event()

    def run() -> None:
        warm_up(model, batched, context)
        ready.set()
        target(*args)  # type: ignore[operator]

    # Every model call from this one thread: with OpenMP, ggml keeps a team of threads per calling thread, and an
    # idle team spins for a while after each graph, taking a core from the working one (on 2 cores, decode 9.1 ->
    # 8.3 tok/s with the warm-up on the main thread and the steps on another; 4.6 with OMP_WAIT_POLICY=active).
    threading.Thread(target=run, daemon=True).start()
    ready.wait()
    with socket.create_server(("127.0.0.1", port)) as listener:
        while True:
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request = read_request(conn)
            if request is None:
                conn.close()
                continue
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            arrivals.put(Sequence(conn, [int(t) for t in request["prompt"]], int(request["n_predict"])))


if __name__ == "__main__":
    main()
