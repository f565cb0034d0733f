"""Output files and directories that appear only when complete (a temporary sibling, renamed)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_output(path: str, *, directory: bool, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of `path`; renames it to `path` only if the block succeeds.

  Nothing that looks complete is left behind on failure: the temporary is removed.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} already exists; remove it or pass --overwrite")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  _remove(tmp)
  if directory:
    os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    _remove(tmp)
    raise
  if os.path.exists(path):
    _remove(path)
  os.replace(tmp, path)


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)
