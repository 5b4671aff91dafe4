"""The wire formats, OpenAI's and Anthropic's: their bodies declared (wire.py, messages_wire.py,
media_wire.py, tokens_wire.py) and read into backends' requests (requests.py, responses_api.py,
messages_request.py, rerank.py, audio.py, images.py, tokens.py; token ids as text: token_ids.py), events
turned into their answers and stream events (completion_objects.py, responses_api.py, messages_codec.py,
sse.py), structured outputs (structured.py: a schema honoured or refused), the declared answers for
/openapi.json (answers.py, messages_answers.py, media_answers.py), and errors (errors.py: every
BackendError class -> status, type and code). No HTTP (Flask stays in web/) and no backend's name: it
speaks to backends only through backends/base.py and backends/media.py, and through
backends/registry.py only in structured.py, to say which models can honour a schema
(tests/unit/test_layers.py)."""
