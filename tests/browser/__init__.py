"""Browser tests of the live training view (a package, so its conftest never shadows tests/conftest.py)."""
