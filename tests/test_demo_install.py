"""`make demo` installs the runtime only; `make test` adds the test stack to the same virtualenv;
commands that need an optional package say how to install it in one line.

The Makefile is exercised with `make -n` (print, do not run) on a copy of it, so the stamp files'
logic is checked without installing anything.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maxgemma import optional_packages

REPO = Path(__file__).resolve().parents[1]
INPUTS = ("Makefile", "requirements.txt", "requirements-test.txt", "requirements-gemma.txt",
          "pyproject.toml")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


@pytest.fixture
def tree(tmp_path):
  for name in INPUTS:
    shutil.copy(REPO / name, tmp_path / name)
  (tmp_path / "venv").mkdir()
  return tmp_path


def _dry_run(tree: Path, target: str) -> str:
  # A clean environment: under `make test` the parent make's MAKEFLAGS/MAKELEVEL would make this
  # one print "Entering directory" lines.
  env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
  p = subprocess.run(["make", "--no-print-directory", "-n", target, "VENV=venv",
                      "PYTHON=python3"], cwd=tree, env=env, capture_output=True, text=True,
                     timeout=60)
  assert p.returncode == 0, p.stderr
  return p.stdout


def _touch_later(path: Path) -> None:
  """Creates `path` with an mtime later than the inputs'."""
  path.touch()
  later = time.time() + 10
  os.utime(path, (later, later))


def test_make_demo_installs_the_runtime_only(tree):
  out = _dry_run(tree, "demo")
  assert "-m venv venv" in out and "-r requirements.txt" in out, out
  assert "requirements-test.txt" not in out and "requirements-gemma.txt" not in out, out
  assert out.rstrip().endswith("venv/bin/python -m maxgemma.demo"), out


def test_make_test_from_a_clean_clone_installs_everything(tree):
  """What .ci/run does: `make test` with no virtualenv."""
  out = _dry_run(tree, "test")
  for part in ("-m venv venv", "-r requirements.txt", "-r requirements-test.txt",
               "-r requirements-gemma.txt", "-m ruff check", "-m pytest"):
    assert part in out, (part, out)


def test_make_test_adds_the_test_stack_to_a_demo_venv(tree):
  _touch_later(tree / "venv" / ".installed-runtime")  # what `make demo` leaves
  out = _dry_run(tree, "test")
  assert "-m venv" not in out, out  # the runtime is not installed again
  assert "-r requirements-test.txt" in out and "-r requirements-gemma.txt" in out, out
  assert "pytest" in out, out


def test_a_complete_venv_installs_nothing(tree):
  _touch_later(tree / "venv" / ".installed-runtime")
  _touch_later(tree / "venv" / ".installed-test")
  out = _dry_run(tree, "test")
  assert "pip install" not in out, out


def test_a_changed_runtime_requirement_reinstalls_both(tree):
  _touch_later(tree / "venv" / ".installed-runtime")
  _touch_later(tree / "venv" / ".installed-test")
  later = time.time() + 20
  os.utime(tree / "requirements.txt", (later, later))
  out = _dry_run(tree, "test")
  assert "-r requirements.txt\n" in out and "-r requirements-test.txt" in out, out


def _uninstall(monkeypatch, *names: str) -> None:
  """Makes `names` look not installed (a None entry in sys.modules: import fails, find_spec
  returns None)."""
  for name in names:
    monkeypatch.setitem(sys.modules, name, None)


def test_a_missing_optional_package_is_one_line_with_the_fix(monkeypatch):
  _uninstall(monkeypatch, "libtpu", "gguf")
  line = optional_packages.missing("libtpu")
  assert "\n" not in line and "pip install 'jax[tpu]'" in line and "AOT compile" in line
  with pytest.raises(optional_packages.MissingPackageError, match=r"pip install 'gguf"):
    optional_packages.require("gguf")


def test_an_installed_optional_package_is_not_reported():
  assert optional_packages.missing("gguf") == ""  # requirements-test.txt installs it


def test_gguf_export_without_gguf_fails_before_reading(monkeypatch, tmp_path):
  from maxgemma.export import export  # noqa: PLC0415
  _uninstall(monkeypatch, "gguf")
  with pytest.raises(optional_packages.MissingPackageError, match="GGUF export and import"):
    export(str(tmp_path / "no-workdir"), "gguf", str(tmp_path / "m.gguf"))
  assert os.listdir(tmp_path) == []
