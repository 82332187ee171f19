"""Fast tests of one module each: the quick check, `python -m pytest -q tests/unit`."""
