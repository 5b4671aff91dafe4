"""The local engine: one process per machine owns the chatglm.cpp Pipelines, their KV caches and
the line of requests waiting for them. gunicorn workers (and any other WSGI process) reach it over
a local socket and only do I/O, so a long prompt evaluation never freezes a worker, a crash of
chatglm.cpp costs only the generations in flight, and every worker shares the same caches.

  protocol.py   the messages on the socket (one JSON object a line)
  model.py      one Pipeline and its cache: chat template, token loop, prefix reuse
  line.py       the first-come-first-served line for the slots
  hosts.py      several models: loaded on demand, unloaded when idle or to make room
  server.py     the engine process: ``python -m backends.chatglm.engine.server``
  relay.py      one generation's events on their way out, in explicit stages (relaying, writing, ended)
  launcher.py   starting the engine, keeping it running
  address.py    where the engine listens (a directory of aigate's user's own) and who may be at either end
  pace.py       how far a reader (a worker, a client handed over) may fall behind the model
  client.py     a worker's side: requests sent, events read back, a client's socket handed over
  client_writer.py  the engine's side of a handed-over client: frames written at the reader's pace
  families.py   what differs between chatglm.cpp's model families: template, tools, detokenizer
"""
