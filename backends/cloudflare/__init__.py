"""Cloudflare Workers AI: transport.py (HTTP over one connection pool), codec.py (its wire format:
request bodies, answers, errors) and backend.py (the Backend: retries, models, chat, embeddings)."""

from backends.cloudflare.backend import CloudflareBackend, CloudflareConfig

__all__ = ["CloudflareBackend", "CloudflareConfig"]
