"""The docs match the tree: the module list, the test folders, the README's length, every relative
link. (Their examples run in tests/integration/test_examples.py.)

docs/design.md, "Where the code lives", is the one list of the package's modules. Each entry is
a line indented by four spaces that starts with a path from the repository root; lines indented
further continue the entry above.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "finch_jax"
DESIGN = ROOT / "docs" / "design.md"
README = ROOT / "README.md"
PAGES = [README, ROOT / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _layout() -> list[str]:
  """The paths of the layout list, in the order written."""
  text = DESIGN.read_text()
  section = text.split("## Where the code lives", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"^    (\S+)", section, flags=re.M)


def _package_entries(layout: list[str]) -> list[str]:
  return [path for path in layout if path.startswith("finch_jax/")]


def _modules_and_packages() -> set[str]:
  """Every module file of the package (less `__init__.py`) and every subpackage directory."""
  found = set()
  for path in PACKAGE.rglob("*.py"):
    relative = path.relative_to(ROOT)
    if "__pycache__" in relative.parts:
      continue
    if path.name == "__init__.py":
      if path.parent != PACKAGE:
        found.add(f"{path.parent.relative_to(ROOT).as_posix()}/")
    else:
      found.add(relative.as_posix())
  return found


def _dotted(path: str) -> str:
  return path.removesuffix("/").removesuffix(".py").replace("/", ".")


def _imports(path: pathlib.Path) -> set[str]:
  """The package modules and subpackages a file imports, as dotted names."""
  known = {_dotted(p) for p in _modules_and_packages()} | {"finch_jax"}
  own = _dotted(path.relative_to(ROOT).as_posix())
  package = own if path.name == "__init__.py" else own.rpartition(".")[0]
  targets = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      names = [f"{base}.{alias.name}" for alias in node.names]  # a name, or a module of base
    else:
      continue
    for name in names:
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name:
        targets.add(name)
  return targets


def test_layout_lists_every_module():
  listed = set(_package_entries(_layout()))
  missing = sorted(_modules_and_packages() - listed)
  assert len(listed) > 20  # the parser found the list
  assert not missing, f"docs/design.md, 'Where the code lives', does not list {missing}"


def test_every_listed_path_exists():
  layout = _layout()
  assert "train.py" in layout and "finch_jax/transform.py" in layout
  absent = [path for path in layout if not (ROOT / path).exists()]
  assert not absent, f"docs/design.md, 'Where the code lives', lists absent paths: {absent}"
  assert len(layout) == len(set(layout)), "docs/design.md lists a path twice"


def test_layout_order_is_the_import_order():
  """A module imports only modules listed above it; a subpackage's line stands for its modules."""
  order = [_dotted(p) for p in _package_entries(_layout())]
  position = {name: i for i, name in enumerate(order)}
  for name in order:  # a subpackage ranks with the last of its modules
    inside = [position[m] for m in order if m.startswith(name + ".")]
    position[name] = max([position[name], *inside])
  upward = []
  for entry in _package_entries(_layout()):
    if entry.endswith("/"):
      continue
    name = _dotted(entry)
    for target in _imports(ROOT / entry):
      if name.startswith(target + "."):
        continue  # its own package (`from finch_jax.data import synthetic`)
      if target in position and position[target] >= position[name]:
        upward.append(f"{name} imports {target}")
  assert not upward, f"docs/design.md lists these modules below what imports them: {upward}"


def test_every_test_lies_in_unit_or_integration():
  """tests/ holds the shared set-up; each test file is in tests/unit or tests/integration."""
  tests = ROOT / "tests"
  layout = _layout()
  assert "tests/unit/" in layout and "tests/integration/" in layout
  loose = sorted(p.name for p in tests.glob("*.py") if p.name not in ("conftest.py", "__init__.py"))
  assert not loose, f"tests/ holds {loose}; move each into tests/unit or tests/integration"
  folders = {p.parent.relative_to(tests).as_posix() for p in tests.rglob("test_*.py")}
  assert folders == {"unit", "integration"}, folders


def test_tests_the_docs_name_exist():
  """A page that says where a feature is tested names a test file that is there."""
  named = {
    (page, path) for page in PAGES for path in re.findall(r"tests/[\w/]+\.py", page.read_text())
  }
  assert len(named) > 5  # the pattern finds them
  absent = sorted(
    f"{page.relative_to(ROOT)}: {path}" for page, path in named if not (ROOT / path).exists()
  )
  assert not absent, f"the docs name test files that do not exist: {absent}"


def test_readme_is_short():
  lines = README.read_text().count("\n")
  assert lines <= MAX_README_LINES, (
    f"README.md has {lines} lines; keep it to {MAX_README_LINES} and move detail to docs/"
  )


def _relative_links(page: pathlib.Path) -> list[str]:
  links = []
  for target in LINK.findall(page.read_text()):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
      continue  # a URL or an anchor on the same page
    links.append(target.split("#", 1)[0])
  return links


def test_links_are_found():
  """The link pattern sees the README's links, so the next test checks something."""
  links = _relative_links(README)
  assert "RESULTS.md" in links and "docs/design.md" in links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_files(page):
  broken = [t for t in _relative_links(page) if not (page.parent / t).exists()]
  assert not broken, f"{page.relative_to(ROOT)} links to files that do not exist: {broken}"
