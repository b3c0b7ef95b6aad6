"""The API under bad input and Cancel in Automatic1111 1.10: the shared bodies of webui_api.py, on the
session's server (conftest's `host`)."""
from webui_api import *  # noqa: F401,F403 - the shared tests, collected here
