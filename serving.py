"""A typed way to the objects create_app builds once for an app (app.AppState: settings, registry,
the policy with its limits and fallbacks, stored responses, running streams), instead of
``app.extensions["aigate"]`` by string."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from flask import Flask, current_app

if TYPE_CHECKING:  # app imports the routes, which import this
    from app import AppState

EXTENSION = "aigate"  # its key in app.extensions (Flask's place for an extension's state)


def state(app: Flask | None = None) -> AppState:
    """The serving objects of ``app``, or of the app handling the current request."""
    return cast("AppState", (app or current_app).extensions[EXTENSION])
