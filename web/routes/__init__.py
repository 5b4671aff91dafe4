"""Blueprints: thin routes that parse, pick a backend, and hand its events to compat."""
