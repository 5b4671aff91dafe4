"""The leanest server we could write, for benchmark 1: the raw engine's token loop (raw_engine.py)
in one process, writing each token's SSE chunk straight to the client socket (no workers, no
engine socket, one connection at a time, no checks). What any server whose client is in another
process pays at least.

    python bench/model_loop_server.py PORT MODEL
"""

from __future__ import annotations

import json
import socket
import sys

from raw_engine import RawEngine

from backends.chatglm.engine.model import Detokenizer


def main() -> None:
    engine = RawEngine(sys.argv[2])
    with socket.create_server(("127.0.0.1", int(sys.argv[1]))) as listener:
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                serve(conn, engine)


def serve(conn: socket.socket, engine: RawEngine) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    if head.startswith(b"GET"):  # readiness
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        return
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += conn.recv(65536)
    request = json.loads(body)
    prompt = engine.prompt_ids(request["messages"])
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
    detokenizer = Detokenizer(engine.tokenizer.decode)
    for token in engine.tokens(prompt, request["max_tokens"]):
        text = detokenizer.add(token)
        if text:
            conn.sendall(b'data: {"choices":[{"delta":{"content":%b}}]}\n\n' % json.dumps(text).encode())
    conn.sendall(b'data: {"choices":[{"delta":{"content":%b}}]}\n\ndata: [DONE]\n\n'
                 % json.dumps(detokenizer.flush()).encode())


if __name__ == "__main__":
    main()
