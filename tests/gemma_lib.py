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


def import_gemma_models():
  """The official library's model classes (`gemma.gm.nn._gemma`: Gemma2_2B ... Gemma3_27B).

  `gm.nn.Gemma3_4B` and the others import `gemma.gm.ckpts`, whose `_checkpoint` does not import
  with kauldron 1.4.2 (tests/test_convert_gemma.py). The models need only `gm.ckpts._paths` (the
  checkpoint names of their `INFO`): the package is stood in by a bare module with the real path,
  so `_paths` loads from its file without the package's `__init__`; the stand-in is removed after.
  """
  import_gemma()
  import os  # noqa: PLC0415

  import gemma  # noqa: PLC0415
  name = "gemma.gm.ckpts"
  stub = None
  if name not in sys.modules:
    stub = types.ModuleType(name)
    stub.__path__ = [os.path.join(os.path.dirname(gemma.__file__), "gm", "ckpts")]
    sys.modules[name] = stub
  try:
    from gemma.gm.nn import _gemma  # noqa: PLC0415
  finally:
    if stub is not None and sys.modules.get(name) is stub:
      del sys.modules[name]
  return _gemma
