"""Stored teacher top-k (offline distillation): the record format and its alignment with the data.

`python -m maxgemma.teacher_logits` writes one ArrayRecord shard per token shard of a prepared
dataset, under the same file name; record i of a shard belongs to document i of the token shard
of that name. A document of n tokens has n - 1 next-token positions (position t predicts token
t + 1, as the pipeline's targets); its record holds, for every position, K sampled ids and their
weights:

  ids      [n - 1, K] little-endian int32
  weights  [n - 1, K] little-endian float16      (6 bytes x K per position)

`manifest.json`, written last, records the teacher (workdir, step), k, how the ids were chosen,
and the identity of the data it was written for (each token shard's name, document count and
sha256), so the pipeline can refuse top-k written for other data before training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from maxgemma import storage
from maxgemma.data import records

FORMAT = "maxgemma.teacher_topk/v1"
ID_DTYPE = np.dtype("<i4")
WEIGHT_DTYPE = np.dtype("<f2")
BYTES_PER_ID = ID_DTYPE.itemsize + WEIGHT_DTYPE.itemsize  # per position: K x this


def encode(ids_NK: np.ndarray, weights_NK: np.ndarray) -> bytes:
  """Bytes of one document's record: ids, then weights."""
  if ids_NK.shape != weights_NK.shape or ids_NK.ndim != 2:
    raise ValueError(f"ids {ids_NK.shape} and weights {weights_NK.shape} must be one [N, K] shape")
  return (np.ascontiguousarray(ids_NK, ID_DTYPE).tobytes()
          + np.ascontiguousarray(weights_NK, WEIGHT_DTYPE).tobytes())


def decode(data: bytes, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids [N, K] int32, weights [N, K] float16) of a record."""
  if len(data) % (k * BYTES_PER_ID):
    raise ValueError(f"a top-k record of {len(data)} bytes is not a whole number of positions "
                     f"of k={k}")
  n = len(data) // (k * BYTES_PER_ID)
  ids = np.frombuffer(data, ID_DTYPE, count=n * k).astype(np.int32).reshape(n, k)
  weights = np.frombuffer(data, WEIGHT_DTYPE, count=n * k, offset=n * k * ID_DTYPE.itemsize)
  return ids, weights.astype(np.float16).reshape(n, k)


def read_manifest(directory: str, setting: str = "--out") -> dict:
  """The manifest of a complete top-k directory, or one line saying how to make it."""
  path = storage.path(directory) / records.MANIFEST
  if not path.is_file():
    raise FileNotFoundError(
        f"{setting}={directory}: no {records.MANIFEST}, not a complete teacher top-k directory; "
        "write (or finish) it with python -m maxgemma.teacher_logits --data=PREPARED_DIR "
        f"--teacher=WORKDIR --out={directory} --k=K")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


@dataclasses.dataclass(frozen=True)
class Aligned:
  """Top-k files aligned one-to-one with a source's token files (`paths[f]` for its file f)."""
  k: int
  paths: tuple[str, ...]
  temperature: float


def align(spec: str, files: Sequence[tuple[str, int, str]],
          setting: str = "config.data.teacher_topk") -> Aligned:
  """The top-k files of `spec` (comma-separated top-k directories) for token files `files`
  ((path, documents, sha256) each); refuses, in one line, a file the directories do not cover
  or cover for other documents, and directories of different k or temperature."""
  dirs = [d.strip() for d in spec.split(",") if d.strip()]
  by_sha: dict[str, tuple[str, int]] = {}
  ks, temps = set(), set()
  for d in dirs:
    if storage.is_remote(d):
      raise ValueError(f"{setting}={d}: top-k directories must be local (copy it first)")
    m = read_manifest(d, setting)
    ks.add(int(m["k"]))
    temps.add(float(m["temperature"]))
    for data_shard, shard in zip(m["data"]["shards"], m["shards"], strict=True):
      by_sha[data_shard["sha256"]] = (os.path.join(d, shard["file"]), int(shard["documents"]))
  if len(ks) > 1 or len(temps) > 1:
    raise ValueError(f"{setting}={spec}: the directories hold different k ({sorted(ks)}) or "
                     f"temperatures ({sorted(temps)}); use top-k written by one teacher run")
  paths = []
  for path, documents, sha256 in files:
    hit = by_sha.get(sha256)
    if hit is None:
      raise ValueError(f"{setting}={spec}: no teacher top-k for {path} (written for other data, "
                       "or that data was prepared again); run python -m maxgemma."
                       f"teacher_logits --data={os.path.dirname(path)} and add its --out")
    if hit[1] != documents:
      raise ValueError(f"{setting}={spec}: {hit[0]} holds {hit[1]} documents, {path} {documents}: "
                       "not written for this data; run python -m maxgemma.teacher_logits "
                       "again")
    paths.append(hit[0])
  return Aligned(k=ks.pop(), paths=tuple(paths), temperature=temps.pop())
