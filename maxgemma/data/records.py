"""Prepared-dataset format: ArrayRecord shards of token records plus a `manifest.json`.

A record is one document's token ids (bos ... eos) as little-endian `token_dtype`; SFT records
append one uint8 loss-mask byte per token. A preference record (`kind: preference`) is one pair:
three little-endian uint32 lengths (prompt, chosen, rejected), then the three token arrays one
after another. The manifest, written last, is what marks a directory as complete.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from maxgemma import storage

FORMAT = "maxgemma.prepared/v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")


def token_dtype(vocab_size: int) -> str:
  """The narrowest dtype that holds every id of a `vocab_size` vocabulary."""
  return "uint16" if vocab_size <= 1 << 16 else "int32"


def encode_record(ids, mask=None, *, dtype: str) -> bytes:
  """Bytes of one document record (`mask` only for SFT data)."""
  data = np.asarray(ids, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
  if mask is not None:
    data += np.asarray(mask, dtype=np.uint8).tobytes()
  return data


def decode_record(data: bytes, *, dtype: str, sft: bool) -> tuple[np.ndarray, np.ndarray | None]:
  """(token ids int32, loss mask uint8 or None) of a record."""
  dt = np.dtype(dtype).newbyteorder("<")
  n = len(data) // (dt.itemsize + 1) if sft else len(data) // dt.itemsize
  ids = np.frombuffer(data, dtype=dt, count=n).astype(np.int32)
  mask = np.frombuffer(data, dtype=np.uint8, offset=n * dt.itemsize) if sft else None
  return ids, mask


def encode_preference(prompt, chosen, rejected, *, dtype: str) -> bytes:
  """Bytes of one preference record: the three lengths, then the three token arrays."""
  parts = [np.asarray(x, dtype=np.dtype(dtype).newbyteorder("<")) for x in
           (prompt, chosen, rejected)]
  header = np.asarray([len(x) for x in parts], dtype=np.dtype("<u4")).tobytes()
  return header + b"".join(x.tobytes() for x in parts)


def decode_preference(data: bytes, *, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(prompt, chosen, rejected) int32 token ids of a preference record."""
  lengths = np.frombuffer(data, dtype=np.dtype("<u4"), count=3).tolist()
  ids = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"), offset=12).astype(np.int32)
  if sum(lengths) != len(ids):
    raise ValueError(f"a preference record of {len(ids)} tokens says {lengths}: not a "
                     "preference record (prepare the data with --kind=preference)")
  a, b = lengths[0], lengths[0] + lengths[1]
  return ids[:a], ids[a:b], ids[b:]


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to a temporary name, then renames: readers never see half a file."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_manifest(directory: str) -> dict:
  """The manifest of a prepared directory, or a clear error saying why it is not usable."""
  path = storage.path(directory) / MANIFEST
  if not path.is_file():
    hint = (" (an interrupted prepare: re-run the same command to finish it)"
            if (storage.path(directory) / ".progress").is_dir() else "")
    raise FileNotFoundError(f"{directory!r} has no {MANIFEST}: not a complete prepared dataset"
                            f"{hint}. Create one with `python -m maxgemma.data.prepare`.")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def verify(directory: str, *, checksums: bool = True) -> dict:
  """Checks every shard of a prepared directory (size and, optionally, sha256); returns manifest."""
  manifest = read_manifest(directory)
  for shard in manifest["shards"]:
    path = os.path.join(directory, shard["file"])
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: shard listed in the manifest is missing")
    if os.path.getsize(path) != shard["bytes"]:
      raise ValueError(f"{path}: {os.path.getsize(path)} bytes, manifest says {shard['bytes']}")
    if checksums and storage.sha256_of(path) != shard["sha256"]:
      raise ValueError(f"{path}: sha256 does not match the manifest (corrupt or replaced)")
  return manifest
