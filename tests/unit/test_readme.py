"""The README's commands: the test command is CI's, the quick check is the unit folder. (Its
examples run in tests/integration/test_examples.py.)"""

import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r"^(python3 -m venv .*)$", README, flags=re.M)
  test_command = next(c for c in commands if "pytest" in c)
  assert test_command in (ROOT / ".ci" / "run").read_text()


def test_the_quick_check_is_the_unit_folder_and_the_full_command_runs_both():
  assert re.search(r"^python -m pytest -q tests/unit$", README, flags=re.M)
  pytest_settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
  paths = pytest_settings["ini_options"]["testpaths"]
  for folder in ("tests/unit", "tests/integration"):
    assert any(folder == path or folder.startswith(path + "/") for path in paths), paths
