"""The in-process app over the fake backend (tests/fake_backend.py), for the route tests."""

from __future__ import annotations

import pytest

from tests.fake_backend import fake_app


@pytest.fixture
def app_and_backend(tmp_path):
    return fake_app(tmp_path)


@pytest.fixture
def client(app_and_backend):
    return app_and_backend[0].test_client()
