"""The WSGI entry point: gunicorn wsgi:application, mod_wsgi, Passenger."""

from app import create_app, start_loading

application = create_app()
start_loading(application)
