"""Optional packages: whether one is installed, and the one line that says how to install it.

`make demo` (requirements.txt) installs neither; `make test` (requirements-test.txt) installs both.
"""

from __future__ import annotations

import importlib.util

# package -> (what needs it, how to install it)
OPTIONAL = {
    "libtpu": ("the AOT compile for TPU topologies", "pip install 'jax[tpu]'"),
    "gguf": ("GGUF export and import", "pip install 'gguf>=0.17,<1'"),
}


class MissingPackageError(ImportError):
  """An optional package a command needs is not installed."""


def missing(name: str) -> str:
  """'' when `name` can be imported, else one line naming what needs it and how to install it."""
  if importlib.util.find_spec(name) is not None:
    return ""
  what, command = OPTIONAL[name]
  return f"{name} is not installed and {what} needs it: {command} (`make test` installs it)"


def require(name: str) -> None:
  """Raises MissingPackageError with `missing(name)`'s line when `name` is not installed."""
  message = missing(name)
  if message:
    raise MissingPackageError(message)
