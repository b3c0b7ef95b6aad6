"""The API under bad input and Cancel in Forge: the shared bodies of tests/a1111/webui_api.py, on the
session's Forge server (conftest's `host`)."""
from webui_api import *  # noqa: F401,F403 - the shared tests, collected here
