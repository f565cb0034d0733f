"""Streaming safetensors I/O: write tensor by tensor into planned shards, read one at a time.

Format: 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian data. Files are read with plain `readinto` (no mmap), so a tensor
costs its own bytes and nothing else stays resident.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

DTYPES: dict[str, Any] = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                          "F64": np.float64, "I32": np.int32, "I64": np.int64}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


class BadFileError(ValueError):
  """A weights file that is truncated, corrupt or not what it claims to be."""


def dtype_name(dtype) -> str:
  try:
    return _NAMES[np.dtype(dtype)]
  except KeyError:
    raise ValueError(f"dtype {dtype} cannot be stored in safetensors here; use one of "
                     f"{', '.join(DTYPES)}") from None


class SafetensorsFile:
  """One .safetensors file: header parsed and checked against the file size up front."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise BadFileError(f"{path} is truncated ({size} bytes): not a safetensors file")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8 or n > 100 << 20:
        raise BadFileError(f"{path}: header size {n} exceeds the file ({size} bytes): truncated "
                           "or not safetensors; re-download or re-export it")
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise BadFileError(f"{path}: unreadable safetensors header ({e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self.data_start = 8 + n
    self.entries: dict[str, dict] = header
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if self.data_start + end > size:
      raise BadFileError(f"{path} is truncated: its header needs {self.data_start + end} bytes, "
                         f"the file has {size}; re-download or re-export it")
    for name, e in header.items():
      if e["dtype"] not in DTYPES:
        raise BadFileError(f"{path}: tensor {name} has dtype {e['dtype']}, not one of "
                           f"{', '.join(DTYPES)}")
      begin, stop = e["data_offsets"]
      want = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(DTYPES[e["dtype"]]).itemsize
      if stop - begin != want:
        raise BadFileError(f"{path}: tensor {name} holds {stop - begin} bytes, its shape "
                           f"{e['shape']} needs {want}")

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def read(self, name: str) -> np.ndarray:
    e = self.entries[name]
    out = np.empty(e["shape"], DTYPES[e["dtype"]])
    with open(self.path, "rb") as f:
      f.seek(self.data_start + e["data_offsets"][0])
      if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
        raise BadFileError(f"{self.path}: tensor {name} is cut short (truncated file)")
    return out


class SafetensorsDir:
  """All tensors of a model: one file, or shards listed in model.safetensors.index.json."""

  def __init__(self, path: str):
    if os.path.isfile(path):
      files = [path]
    elif os.path.isfile(os.path.join(path, INDEX)):
      with open(os.path.join(path, INDEX)) as f:
        weight_map = json.load(f)["weight_map"]
      files = [os.path.join(path, n) for n in sorted(set(weight_map.values()))]
    else:
      files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"no .safetensors files in {path}")
    for f in files:
      if not os.path.isfile(f):
        raise FileNotFoundError(f"{f} is listed in {INDEX} but missing: the download is "
                                "incomplete")
    self.files = [SafetensorsFile(f) for f in files]
    self.where = {name: sf for sf in self.files for name in sf.entries}

  def names(self) -> list[str]:
    return list(self.where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.where[name].shape(name)

  def read(self, name: str) -> np.ndarray:
    return self.where[name].read(name)


class ShardedWriter:
  """Writes planned tensors in any order into shards of at most `max_shard_bytes`."""

  def __init__(self, directory: str, specs: dict[str, tuple[tuple[int, ...], Any]],
               max_shard_bytes: int = 2 << 30, metadata: dict[str, str] | None = None):
    shards: list[dict[str, tuple]] = [{}]
    size = 0
    for name, (shape, dtype) in specs.items():
      nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
      if shards[-1] and size + nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = (tuple(shape), np.dtype(dtype), nbytes)
      size += nbytes
    n = len(shards)
    self.files = ["model.safetensors"] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    self.directory = directory
    self.where: dict[str, tuple[int, int, np.dtype, tuple]] = {}
    self.written: set[str] = set()
    self._fds = []
    for i, shard in enumerate(shards):
      header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
      offset = 0
      for name, (shape, dtype, nbytes) in shard.items():
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
      raw = json.dumps(header, separators=(",", ":")).encode()
      raw += b" " * (-len(raw) % 8)
      f = open(os.path.join(directory, self.files[i]), "wb")  # noqa: SIM115
      f.write(struct.pack("<Q", len(raw)) + raw)
      start = 8 + len(raw)
      f.truncate(start + offset)
      self._fds.append(f)
      for name, (shape, dtype, _) in shard.items():
        self.where[name] = (i, start + header[name]["data_offsets"][0], dtype, shape)

  def write(self, name: str, array: np.ndarray) -> None:
    i, offset, dtype, shape = self.where[name]
    if tuple(array.shape) != shape:
      raise ValueError(f"tensor {name}: shape {array.shape}, planned {shape}")
    data = np.ascontiguousarray(array.astype(dtype, copy=False))
    self._fds[i].seek(offset)
    self._fds[i].write(memoryview(data.reshape(-1).view(np.uint8)))
    self.written.add(name)

  def close(self) -> None:
    missing = set(self.where) - self.written
    for f in self._fds:
      f.close()
    if missing:
      raise RuntimeError(f"tensors never written: {sorted(missing)[:5]}")
    if len(self.files) > 1:
      index = {"metadata": {"total_size": sum(
          int(np.prod(s, dtype=np.int64)) * d.itemsize for _, _, d, s in self.where.values())},
               "weight_map": {n: self.files[w[0]] for n, w in self.where.items()}}
      with open(os.path.join(self.directory, INDEX), "w") as f:
        json.dump(index, f, indent=2)
