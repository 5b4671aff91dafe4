"""Backends, the bottom layer: each turns a validated ChatRequest into events (base.py) and reports
failures as BackendError classes: the local model (chatglm/), Workers AI (cloudflare/) and
OpenAI-compatible upstreams (upstream/), side by side (none imports another), with what they share:
base.py, media.py (rerank, audio, images), registry.py (model id -> backend), stops.py, sse_reader.py,
bounded.py, chat_messages.py, tokens.py (a backend that has its model's tokenizer). None knows aigate's
HTTP side or the wire shapes it serves, and none imports a layer above (the settings and metrics they
need are passed in; tests/unit/test_layers.py)."""
