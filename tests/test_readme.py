"""The README's examples run as written, and its commands match CI."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
  assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_example_runs(index):
  exec(compile(PYTHON_BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r"^(python3 -m venv .*)$", README, flags=re.M)
  test_command = next(c for c in commands if "pytest" in c)
  assert test_command in (ROOT / ".ci" / "run").read_text()


def test_main_job_example_runs():
  import subprocess
  import sys

  out = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "quickstart.py")],
    capture_output=True,
    text=True,
    check=True,
    timeout=300,
  ).stdout
  assert "finch(adam)" in out and "forgetting" in out
