"""The HTTP runtime, the top layer: the routes (routes/, thin), each request's context (context.py), keys
checked before the body is read (auth.py), the body read and bounded (body.py, json_body.py), the
rate limits (rate_limits.py), the request log and its record (request_log.py, record.py), the metrics
(metrics.py), errors as responses (errors.py; Anthropic's shape: messages_errors.py), how a generation
starts and a stream is written (generation.py, sse_writer.py, client_socket.py), the tasks besides chat
(tasks.py) and the answers passed on as a backend made them (raw_answers.py), the streams a stopping
worker ends (streams.py), and gunicorn's worker (gunicorn_worker.py).

May import config/, store/, compat/ and backends/; nothing below imports this (tests/unit/test_layers.py).
"""
