"""Engines. Each turns a validated ChatRequest into events; none knows HTTP or JSON wire shapes."""
