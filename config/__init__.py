"""Configuration: every setting declared once (settings.py, with fields.py's declaring and reading),
and what the settings decide about requests (policy.py). Read once at start and fail-fast.

May import compat/ and backends/ (the types settings are read into); never web/ (tests/unit/test_layers.py).
"""
