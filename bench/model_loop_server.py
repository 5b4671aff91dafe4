"""The leanest server we could write, for benchmark 1: chatglm_cpp.Pipeline's token loop in one
process, writing each token's SSE chunk straight to the client socket (no workers, no engine
socket, one connection at a time, no checks). What any server whose client is in another process
pays at least.

    python bench/model_loop_server.py PORT MODEL
"""

from __future__ import annotations

import json
import socket
import sys

import chatglm_cpp


def main() -> None:
    pipeline = chatglm_cpp.Pipeline(sys.argv[2])
    tokenizer = pipeline.tokenizer
    with socket.create_server(("127.0.0.1", int(sys.argv[1]))) as listener:
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                serve(conn, pipeline, tokenizer)


def serve(conn: socket.socket, pipeline, tokenizer) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    if head.startswith(b"GET"):  # readiness
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        return
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += conn.recv(65536)
    request = json.loads(body)
    ids = tokenizer.apply_chat_template([chatglm_cpp.ChatMessage(role=m["role"], content=m["content"])
                                         for m in request["messages"]], 1 << 30)
    config = chatglm_cpp._C.GenerationConfig(max_length=2048, max_new_tokens=request["max_tokens"],
                                             max_context_length=2048, do_sample=False)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
    out: list[int] = []
    said = ""
    for token in pipeline._stream_generate_ids(list(ids), None, config):
        out.append(token)
        text = tokenizer.decode(out)
        conn.sendall(b'data: {"choices":[{"delta":{"content":%b}}]}\n\n' % json.dumps(text[len(said):]).encode())
        said = text
    conn.sendall(b"data: [DONE]\n\n")


if __name__ == "__main__":
    main()
