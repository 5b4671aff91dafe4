"""Cloudflare Workers AI: transport.py (HTTP over one connection pool), codec.py (its wire format:
request bodies, answers, errors), media.py (the wire format of reranking, speech recognition, speech
and images) and backend.py (the Backend: retries, models, chat, embeddings, the media tasks)."""

from backends.cloudflare.backend import CloudflareBackend, CloudflareConfig

__all__ = ["CloudflareBackend", "CloudflareConfig"]
