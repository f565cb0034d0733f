"""Reading checkpoints one array (or one layer slice) at a time, and writing outputs atomically.

`OrbaxArrays` opens an orbax PyTree checkpoint directory (maxgemma's `params` item, or an official
Gemma checkpoint) through tensorstore and reads single arrays or `array[i]` slices, so converting
a model never holds more than one layer's tensors besides the output. `WorkdirReader` gives a
maxgemma checkpoint's blocks in the official tree, whether it was saved scanned or unrolled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorstore as ts

from maxgemma import storage
from maxgemma.model.config import ModelConfig

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
  out: dict = {}
  for key, value in flat.items():
    node = out
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = value
  return out


class WorkdirReader:
  """A maxgemma checkpoint (`WORKDIR/checkpoints/<step>`), read layer by layer."""

  def __init__(self, workdir: str, step: int | None = None):
    from maxgemma.checkpoint import Checkpointer, model_config_from_dict  # noqa: PLC0415

    ckpt = Checkpointer(workdir, read_only=True)
    self.step = ckpt.latest_step() if step is None else step
    if self.step is None or self.step not in ckpt.all_steps():
      raise FileNotFoundError(f"no complete checkpoint{'' if step is None else f' {step}'} in "
                              f"{ckpt.directory}; steps there: {ckpt.all_steps() or 'none'}")
    self.meta = ckpt.meta(self.step)
    ckpt.close()
    self.workdir = workdir
    self.config: ModelConfig = model_config_from_dict(self.meta["model"])
    self.arrays = OrbaxArrays(storage.join(workdir, "checkpoints", str(self.step), "params"))
    self.scanned = any(k[0] == "layers" for k in self.arrays.keys)

  def globals(self) -> dict:
    """`embedder` and `final_norm` subtrees."""
    return nest({k: self.arrays.read(k) for k in self.arrays.keys
                 if k[0] in ("embedder", "final_norm")})

  def block(self, i: int) -> dict:
    """Layer i as the official `layer_{i}` subtree."""
    if self.scanned:
      return nest({k[1:]: self.arrays.read(k, i) for k in self.arrays.keys if k[0] == "layers"})
    return nest({k[1:]: self.arrays.read(k) for k in self.arrays.keys if k[0] == f"layer_{i}"})

  def leaf(self, i: int, path: tuple[str, ...]) -> np.ndarray:
    """One leaf of layer i, e.g. ("pre_attention_norm", "scale")."""
    if self.scanned:
      return self.arrays.read(("layers", *path), i)
    return self.arrays.read((f"layer_{i}", *path))

  def block_paths(self) -> list[tuple[str, ...]]:
    first = "layers" if self.scanned else "layer_0"
    return [k[1:] for k in self.arrays.keys if k[0] == first]

  def tokenizer_path(self, override: str = "") -> str:
    return resolve_tokenizer(self.workdir, override, self.meta)


def resolve_tokenizer(workdir: str, override: str = "", meta: dict | None = None) -> str:
  """The tokenizer of a workdir: the flag, WORKDIR/tokenizer.model, the training config's, or
  "" (the packaged demo tokenizer)."""
  if override:
    return override
  local = storage.join(workdir, "tokenizer.model")
  if storage.path(local).is_file():
    return local
  if meta is None:
    try:
      from maxgemma.checkpoint import Checkpointer  # noqa: PLC0415
      ckpt = Checkpointer(workdir, read_only=True)
      meta = ckpt.meta() if ckpt.latest_step() is not None else {}
      ckpt.close()
    except Exception:  # noqa: BLE001  (no checkpoint: fall back to the demo tokenizer)
      meta = {}
  cfg = (meta or {}).get("config") or {}
  return str((cfg.get("data") or {}).get("tokenizer") or "")


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
