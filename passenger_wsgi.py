"""Phusion Passenger / cPanel "Setup Python App" entry point (the Application startup file).

Passenger runs each process single-threaded and without gevent: one request at a time per
process, so every open stream holds a process; raise PassengerMaxPoolSize for concurrency.
Settings come from the app's environment variables (cPanel's form) or a .env file here.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.chdir(os.path.dirname(os.path.abspath(__file__)))  # .env and the demo model are found from here

from app import create_app, load_backends  # noqa: E402

# To stderr, which Passenger writes to its log.
logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] [%(levelname)s] %(message)s")

application = create_app()
load_backends(application)  # before the first request: Passenger's start timeout covers it
