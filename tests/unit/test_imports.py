"""The package's imports go one way: no cycle, and no import of the package inside a function."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "finch_jax"


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str) -> list[tuple[str, bool]]:
  """(imported package module, whether inside a function) for each import of the package."""
  tree = ast.parse(path.read_text())
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = []

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
      if isinstance(child, ast.Import):
        found.extend((a.name, inside) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        found.extend((f"{base}.{a.name}", inside) for a in child.names)
        found.append((base, inside))
      visit(child, inside)

  visit(tree, False)
  return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
  modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
  edges, local = {m: set() for m in modules}, []
  for name, path in modules.items():
    for target, inside in _imports(path, name):
      while target and target not in modules:
        target = target.rpartition(".")[0]
      if not target or target == name:
        continue
      if inside:
        local.append(f"{name} -> {target}")
      if not modules[target].name == "__init__.py":  # re-exports of a package are not a layer
        edges[name].add(target)
  return edges, local


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for target in sorted(edges[node]):
      if state.get(target) == 1:
        return path[path.index(target) :] + [target]
      if target not in state and (found := visit(target)):
        return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(edges):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_import_cycle():
  edges, _ = _graph()
  assert len(edges) > 20  # the walk found the package
  assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_no_import_of_the_package_inside_a_function():
  _, local = _graph()
  assert local == []


def test_the_checker_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_orchestration_sits_above_what_it_uses():
  edges, _ = _graph()
  assert "finch_jax.run" in edges["finch_jax.sweep"]
  for low in ("finch_jax.report", "finch_jax.trainer", "finch_jax.optim", "finch_jax.transform"):
    assert not edges[low] & {"finch_jax.run", "finch_jax.sweep", "finch_jax.experiment"}, low
  assert not edges["finch_jax.report"] & {"finch_jax.configure", "finch_jax.validate"}
