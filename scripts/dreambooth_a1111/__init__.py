"""The Automatic1111 WebUI adapter: the "a1111" backend, the background job, API routes and tab.

Imported by `scripts/dreambooth_tab.py` (the one file the WebUI loads); it imports the WebUI's
`modules` only inside functions, and dreambooth_core for all training logic.
"""
