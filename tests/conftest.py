"""Test set-up: eight host CPU devices, so sharded and mapped code runs on one machine."""

import os

# Must happen before JAX is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
