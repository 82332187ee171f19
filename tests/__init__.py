"""The test suite: tests/unit (fast, one module each) and tests/integration (runs end to end)."""
