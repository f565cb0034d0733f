"""The package's floors (docs/architecture.md): no import cycle, and the model names no mesh axis.

Imports are read from the source (every `import` statement, those inside functions too), so the
test needs no jax and sees lazy imports that a cycle could hide behind.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "maxgemma"
# The mesh axes of maxgemma/sharding.py's MESH_AXES, spelled out so this test stays jax-free;
# test_mesh_axes_listed_here_are_the_meshs checks the two agree.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")


def _modules() -> dict[str, Path]:
  out = {}
  for f in sorted(PACKAGE.rglob("*.py")):
    parts = list(f.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = f
  return out


MODULES = _modules()


def _known(name: str) -> str | None:
  """`name`, or its nearest enclosing package module, if it is part of maxgemma."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(name: str, file: Path, third_party: bool = False) -> dict[str, int]:
  """maxgemma modules that `file` imports -> the line of the first such import (with
  `third_party`, the top-level names of the other packages it imports instead)."""
  package = name if file.name == "__init__.py" else name.rpartition(".")[0]
  found: dict[str, int] = {}
  for node in ast.walk(ast.parse(file.read_text(), str(file))):
    targets: list[str] = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([node.module] if node.module else []))
      # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    for t in targets:
      m = _known(t)
      if third_party and not m and not (isinstance(node, ast.ImportFrom) and node.level):
        found.setdefault(t.partition(".")[0], node.lineno)
      elif not third_party and m and m != name:
        found.setdefault(m, node.lineno)
  return found


GRAPH = {name: _imports(name, file) for name, file in MODULES.items()}


def _cycle() -> list[str]:
  """One import cycle as [a, b, ..., a], or []."""
  state: dict[str, int] = {}  # 1 on the current path, 2 done
  path: list[str] = []

  def visit(v: str) -> list[str]:
    state[v] = 1
    path.append(v)
    for w in sorted(GRAPH[v]):
      if state.get(w) == 1:
        return path[path.index(w):] + [w]
      if w not in state:
        found = visit(w)
        if found:
          return found
    path.pop()
    state[v] = 2
    return []

  for v in sorted(GRAPH):
    if v not in state:
      found = visit(v)
      if found:
        return found
  return []


def test_the_graph_sees_known_imports():
  """The reader of imports finds edges that exist (so an empty result means something)."""
  assert "maxgemma.model.config" in GRAPH["maxgemma.model.presets"]
  assert "maxgemma.convert.hf" in GRAPH["maxgemma.export"]  # `from maxgemma.convert import hf`
  assert "maxgemma.storage" in GRAPH["maxgemma.checkpoint"]
  assert "maxgemma.checkpoint" in GRAPH["maxgemma.convert.checkpoint_reader"]  # inside a method


def test_no_import_cycle():
  cycle = _cycle()
  assert not cycle, (
      "import cycle: " + " -> ".join(
          f"{a} (line {GRAPH[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False))
      + f" -> {cycle[-1]}; move what both need into a module that imports neither "
      "(see docs/architecture.md)")


def _model_modules() -> list[str]:
  return [m for m in MODULES if m.startswith("maxgemma.model.")]


@pytest.mark.parametrize("module", _model_modules())
def test_model_imports_only_the_model(module):
  """The model knows logical axes, not meshes, devices, optimizers, data or files."""
  outside = {m: line for m, line in GRAPH[module].items()
             if m != "maxgemma" and not m.startswith("maxgemma.model.")}
  assert not outside, (f"{MODULES[module].relative_to(ROOT)} imports {outside} (module: line); "
                       "the model may import only maxgemma.model.*: pass what it needs in, or "
                       "move the code up a floor (docs/architecture.md)")


@pytest.mark.parametrize("module", _model_modules())
def test_model_names_no_mesh_axis(module):
  """Mesh axes belong to maxgemma/sharding.py's rules table; the model speaks logical axes."""
  file = MODULES[module]
  hits = sorted({(n.lineno, n.value) for n in ast.walk(ast.parse(file.read_text()))
                 if isinstance(n, ast.Constant) and n.value in MESH_AXES})
  assert not hits, (f"{file.relative_to(ROOT)} names mesh axes {hits} (line, name); use a "
                    "logical axis name and map it in maxgemma/sharding.py's RULES")


@pytest.mark.parametrize("floor,forbidden", [
    ("maxgemma.data.", ("maxgemma.model.", "maxgemma.trainer", "maxgemma.sharding")),
    ("maxgemma.convert.", ("maxgemma.trainer", "maxgemma.sharding")),
    ("maxgemma.export", ("maxgemma.trainer",)),
    ("maxgemma.import_weights", ("maxgemma.trainer",)),
    ("maxgemma.sample", ("maxgemma.trainer",)),
])
def test_floors_import_down_only(floor, forbidden):
  bad = {f"{m} -> {t} (line {line})" for m in MODULES if m.startswith(floor)
         for t, line in GRAPH[m].items() if t.startswith(forbidden)}
  assert not bad, (f"{sorted(bad)}: {floor}* must not import {forbidden} "
                   "(docs/architecture.md lists who may import whom)")


# What `make test` adds to `make demo`'s requirements.txt (requirements-test.txt, -gemma.txt).
TEST_STACK = ("torch", "transformers", "gemma", "kauldron", "libtpu", "safetensors", "pytest")
# The modules `make demo` runs (maxgemma/demo.py starts the other three as subprocesses).
DEMO_ENTRY_POINTS = ("maxgemma.demo", "maxgemma.train", "maxgemma.export", "maxgemma.sample")


def test_demo_needs_only_the_runtime():
  """Nothing the demo's commands import, directly or through maxgemma, lazily or not, is a
  package only `make test` installs. (gguf is imported only by the GGUF paths, after
  `maxgemma.optional_packages.require("gguf")`.)"""
  reach, todo = set(), list(DEMO_ENTRY_POINTS)
  while todo:
    m = todo.pop()
    if m not in reach:
      reach.add(m)
      todo.extend(GRAPH[m])
  assert "maxgemma.trainer.loop" in reach and "maxgemma.convert.hf" in reach  # the walk works
  bad = sorted(f"{m} imports {pkg} (line {line})" for m in reach
               for pkg, line in _imports(m, MODULES[m], third_party=True).items()
               if pkg in TEST_STACK)
  assert not bad, (f"{bad}: `make demo` installs requirements.txt only; import the package "
                   "where only the feature that needs it runs, after "
                   "maxgemma.optional_packages.require(name)")


def test_mesh_axes_listed_here_are_the_meshs():
  from maxgemma import sharding  # noqa: PLC0415
  assert tuple(sharding.MESH_AXES) == MESH_AXES
