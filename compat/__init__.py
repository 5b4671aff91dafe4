"""The OpenAI wire protocol: the wire types declared (wire.py, answers.py), parsing requests, building
responses, SSE, errors, the routes. It speaks to backends only through backends/base.py (ChatRequest
in, events and BackendErrors out, each error class mapped to an OpenAI error in errors.py); no module
here knows a particular backend."""
