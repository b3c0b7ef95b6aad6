"""Integration tests against the real ComfyUI host (see conftest.py)."""
