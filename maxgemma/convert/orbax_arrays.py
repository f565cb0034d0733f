"""The arrays of an orbax PyTree checkpoint, read one array (or one layer slice) at a time.

`OrbaxArrays` opens an orbax PyTree checkpoint directory (maxgemma's `params` item, or an official
Gemma checkpoint) through tensorstore and reads single arrays or `array[i]` slices, so converting
a model never holds more than one layer's tensors besides the output.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tensorstore as ts

from maxgemma import storage

Key = tuple[str, ...]


class OrbaxArrays:
  """The arrays of one orbax PyTree checkpoint directory, read lazily with tensorstore."""

  def __init__(self, directory: str):
    self.directory = storage.absolute(directory)
    meta_path = storage.path(self.directory) / "_METADATA"
    if not meta_path.is_file():
      raise FileNotFoundError(f"{self.directory} is not an orbax checkpoint (no _METADATA); pass "
                              "the directory orbax wrote (it holds _METADATA and manifest.ocdbt)")
    meta = json.loads(meta_path.read_text())
    self.use_ocdbt = bool(meta.get("use_ocdbt", True))
    self.use_zarr3 = bool(meta.get("use_zarr3", False))
    self.keys: list[Key] = [tuple(str(k["key"]) for k in v["key_metadata"])
                            for v in meta["tree_metadata"].values()]
    self._open: dict[Key, Any] = {}

  def _store(self, key: Key):
    if key not in self._open:
      name = ".".join(key)
      base = storage.tensorstore_url(self.directory)
      kv = {"driver": "ocdbt", "base": base, "path": name} if self.use_ocdbt else base + name
      spec = {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kv}
      try:
        self._open[key] = ts.open(spec, read=True).result()
      except Exception as e:  # tensorstore raises ValueError with the storage error text
        raise ValueError(f"{self.directory}: array {'/'.join(key)} cannot be opened "
                         f"({str(e).splitlines()[0][:200]}); the checkpoint is incomplete or "
                         "damaged") from None
    return self._open[key]

  def shape(self, key: Key) -> tuple[int, ...]:
    return tuple(self._store(key).shape)

  def dtype(self, key: Key) -> np.dtype:
    return np.dtype(self._store(key).dtype.numpy_dtype)

  def read(self, key: Key, index: int | None = None) -> np.ndarray:
    """The array at `key`, or only its slice `[index]` along the first axis."""
    store = self._store(key)
    try:
      return np.asarray((store if index is None else store[index]).read().result())
    except Exception as e:
      raise ValueError(f"{self.directory}: array {'/'.join(key)} cannot be read "
                       f"({str(e).splitlines()[0][:200]}); the checkpoint is damaged") from None


def nest(flat: dict[Key, Any]) -> dict:
  """{("a", "b"): x} -> {"a": {"b": x}}."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = value
  return out
