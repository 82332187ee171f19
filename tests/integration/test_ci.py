"""Under CI a test whose dependencies do not import fails instead of skipping."""

import os
import shutil
import subprocess
import sys

CONFTEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conftest.py")


TESTS = {
  "test_needs_missing.py": (
    'import pytest\n\npytest.importorskip("no_such_module_here")\n\n\ndef test_x():\n  pass\n'
  ),
  "test_skips.py": 'import pytest\n\n\ndef test_y():\n  pytest.skip("a dependency is missing")\n',
}


def _run(tmp_path, ci: str, names=tuple(TESTS)) -> subprocess.CompletedProcess:
  shutil.copy(CONFTEST, tmp_path / "conftest.py")
  for name in names:
    (tmp_path / name).write_text(TESTS[name])
  env = {**os.environ, "CI": ci}
  return subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
    capture_output=True,
    text=True,
    env=env,
    cwd=tmp_path,
    timeout=120,
  )


def test_a_module_that_cannot_import_its_dependency_fails_under_ci(tmp_path):
  result = _run(tmp_path, "true", ["test_needs_missing.py"])
  assert result.returncode != 0, result.stdout
  assert "skipped under CI=true" in result.stdout, result.stdout


def test_a_skipped_test_fails_under_ci(tmp_path):
  result = _run(tmp_path, "true", ["test_skips.py"])
  assert result.returncode == 1, result.stdout
  assert "1 failed" in result.stdout, result.stdout


def test_a_skip_stays_a_skip_locally(tmp_path):
  result = _run(tmp_path, "")
  assert result.returncode == 0, result.stdout
  assert "2 skipped" in result.stdout, result.stdout
