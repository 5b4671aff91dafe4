"""Backends. Each turns a validated ChatRequest into events (backends/base.py) and reports failures as
BackendError classes; none knows aigate's HTTP side or OpenAI's wire shapes (compat/ maps the
events to chunks and the error classes to statuses and codes). A backend may speak its own
upstream's wire format (cloudflare/codec.py)."""
