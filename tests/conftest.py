"""Test set-up: eight host CPU devices, so sharded and mapped code runs on one machine."""

import os

# Must happen before JAX is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from finch_jax.models.gguf import gguf_tokenizer, smollm2_path  # noqa: E402

# Under CI (CI=true) a skip is a failure: a test whose dependency did not import must not let the
# suite go green without it (the Hugging Face parity tests, say). Locally a skip stays a skip.
STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _fail_if_skipped(report) -> None:
  if STRICT and report.skipped and not hasattr(report, "wasxfail"):
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where every test must run: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  """A module skipped at import (`pytest.importorskip`) fails under CI."""
  outcome = yield
  _fail_if_skipped(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """A test skipped while it runs fails under CI."""
  outcome = yield
  _fail_if_skipped(outcome.get_result())


@pytest.fixture(scope="session")
def smollm2() -> str:
  """The installed SmolLM2-135M-Instruct GGUF file (the README's test set-up installs it)."""
  try:
    return smollm2_path()
  except FileNotFoundError as error:
    pytest.skip(str(error))  # a failure under CI, where it is installed


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
  """SmolLM2-135M-Instruct's tokenizer, read from its GGUF file."""
  return gguf_tokenizer(smollm2)
