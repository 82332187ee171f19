"""The examples of the README and the guides in docs/ run as written, and so does the main job's
example, examples/quickstart.py."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = PYTHON_BLOCK.findall(README)


def test_readme_has_examples():
  assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_example_runs(index):
  exec(compile(PYTHON_BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_main_job_example_runs():
  out = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "quickstart.py")],
    capture_output=True,
    text=True,
    check=True,
    timeout=300,
  ).stdout
  assert "finch(adam)" in out and "forgetting" in out


DOC_EXAMPLES = [
  (page, index, block)
  for page in sorted((ROOT / "docs").glob("*.md"))
  for index, block in enumerate(PYTHON_BLOCK.findall(page.read_text()))
]


@pytest.mark.parametrize(
  "page, index, block",
  DOC_EXAMPLES,
  ids=[f"{p.name}[{i}]" for p, i, _ in DOC_EXAMPLES],
)
def test_docs_example_runs(page, index, block):
  exec(compile(block, f"{page.relative_to(ROOT)}[python block {index}]", "exec"), {})
