"""The WSGI entry point: gunicorn wsgi:application, or mod_wsgi (Passenger has passenger_wsgi.py)."""

from app import create_app, start_loading
from config.settings import checked

# Under gunicorn, the settings its master checked (see config.settings.checked); elsewhere, read them now.
application = create_app(checked())
start_loading(application)
