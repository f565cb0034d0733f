"""Importing the official `gemma` library (3.3.0) without TensorFlow.

`kauldron.typing` imports tensorflow only to name `tf.Tensor`: a stand-in module is put into
`sys.modules` for the import and removed after, so etils does not think TensorFlow is present.
"""

from __future__ import annotations

import sys
import types


def import_gemma():
  """Returns `gemma.gm` (the official library's model package)."""
  stub = None
  if "tensorflow" not in sys.modules:
    stub = types.ModuleType("tensorflow")
    stub.Tensor = type("Tensor", (), {})
    sys.modules["tensorflow"] = stub
  try:
    import kauldron.typing  # noqa: F401, PLC0415
    from gemma import gm  # noqa: PLC0415
    from gemma.gm.nn import _modules  # noqa: F401, PLC0415
  finally:
    if stub is not None and sys.modules.get("tensorflow") is stub:
      del sys.modules["tensorflow"]
  return gm
