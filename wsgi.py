"""The WSGI entry point: gunicorn wsgi:application, mod_wsgi, Passenger."""

from app import create_app, start_loading
from config.settings import checked

# Under gunicorn, the settings its master checked (see settings.checked); elsewhere, read them now.
application = create_app(checked())
start_loading(application)
