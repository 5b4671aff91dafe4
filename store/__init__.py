"""State kept between requests: the Responses API's stored responses (response_store.py: SQLite in
STATE_DIR, per key, bounded). Imports no other package of aigate (tests/unit/test_layers.py)."""
