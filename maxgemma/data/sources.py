"""`config.data.sources` parsing: "GLOB[:WEIGHT],GLOB[:WEIGHT]" -> prepared shard lists."""

from __future__ import annotations

import dataclasses
import glob
import os

from maxgemma import storage
from maxgemma.data import records


@dataclasses.dataclass(frozen=True)
class Source:
  """One mixture component: shards of one kind, dtype and tokenizer, with a sampling weight.

  `paths` are where the shard files live (local, or `gs://` URLs); `local_path(f)` gives a local
  file to open, fetching a remote shard into the verified cache the first time it is asked for,
  so a host only downloads the files its loader shards read.
  """
  spec: str
  weight: float
  paths: tuple[str, ...]
  kind: str  # pretrain | sft | preference
  token_dtype: str
  tokenizer_fingerprint: str
  manifests: tuple[str, ...]
  documents: int
  file_documents: tuple[int, ...] = ()  # records per file of `paths`, from the manifests
  file_bytes: tuple[int, ...] = ()
  file_sha256: tuple[str, ...] = ()
  cache: str = ""

  def local_path(self, f: int) -> str:
    """A local file holding shard file `f` (a verified cached copy when it is remote)."""
    p = self.paths[f]
    if not storage.is_remote(p):
      return p
    return storage.cached_copy(p, size=self.file_bytes[f], sha256=self.file_sha256[f],
                               cache=self.cache)


def demo_dir() -> str:
  """The packaged demo corpus, prepared (`maxgemma/data/assets`)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def parse_sources(spec: str) -> list[tuple[str, float]]:
  """[(glob, weight)] of "GLOB[:WEIGHT],..."; a weight is the part after the last ':' if numeric."""
  out = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    pattern, weight = item, 1.0
    head, sep, tail = item.rpartition(":")
    if sep and head:
      try:
        pattern, weight = head, float(tail)
      except ValueError:
        pass  # a ':' that is part of the path (gs://...)
    if not weight > 0:
      raise ValueError(f"source {item!r}: weight must be > 0")
    out.append((pattern, weight))
  return out


def _shards_of(directory: str, split: str) -> tuple[dict, list[str]]:
  manifest = records.read_manifest(directory)
  paths = [os.path.join(directory, s["file"]) for s in manifest["shards"]
           if s["split"] == split and s["documents"] > 0]
  return manifest, paths


def _glob(pattern: str, setting: str) -> list[str]:
  """Files matching a local glob, or a `gs://` glob whose wildcards are in the last component."""
  if not storage.is_remote(pattern):
    return sorted(glob.glob(os.path.expanduser(pattern)))
  parent, _, name = pattern.rpartition("/")
  if glob.has_magic(parent):
    raise ValueError(f"{setting}: {pattern!r}: in a gs:// source only the file name may hold "
                     "wildcards (gs://BUCKET/DIR/*.array_record)")
  return sorted(str(p) for p in storage.path(parent).glob(name))


def resolve(pattern: str, weight: float, split: str, *, setting: str, cache: str = "") -> Source:
  """The shards a source names: a prepared directory (its `split` shards) or a shard glob.

  Shards in Cloud Storage are fetched lazily (`Source.local_path`) into the local cache `cache`."""
  pattern = pattern or demo_dir()
  if storage.path(pattern).is_dir():
    by_dir = {pattern: _shards_of(pattern, split)}
  else:
    matches = [m for m in _glob(pattern, setting) if m.endswith(".array_record")]
    if not matches:
      raise ValueError(f"{setting}: {pattern!r} matched no prepared .array_record shards nor a "
                       "prepared directory; run `python -m maxgemma.data.prepare` first")
    by_dir = {}
    for m in matches:
      directory = os.path.dirname(m) or "."
      if directory not in by_dir:
        manifest, _ = _shards_of(directory, split)
        by_dir[directory] = (manifest, [])
      listed = {s["file"]: s for s in by_dir[directory][0]["shards"]}
      if os.path.basename(m) not in listed:
        raise ValueError(f"{setting}: {m} is not listed in {directory}/manifest.json "
                         "(unfinished or foreign shard)")
      if listed[os.path.basename(m)]["documents"] > 0:
        by_dir[directory][1].append(m)
  manifests = [m for m, _ in by_dir.values()]
  paths = [p for _, ps in by_dir.values() for p in ps]
  for field in ("kind", "token_dtype"):
    if len({m[field] for m in manifests}) > 1:
      raise ValueError(f"{setting}: {pattern!r} mixes datasets of different {field}")
  if len({m["tokenizer"]["fingerprint"] for m in manifests}) > 1:
    raise ValueError(f"{setting}: {pattern!r} mixes datasets prepared with different tokenizers")
  if not paths:
    raise ValueError(f"{setting}: {pattern!r} has no {split!r} documents"
                     + (" (prepare with --eval_fraction > 0, or set config.data.eval_sources)"
                        if split == "eval" else ""))
  shards = {os.path.join(d, s["file"]): s for d, (m, _) in by_dir.items() for s in m["shards"]}
  docs = sum(shards[p]["documents"] for p in paths)
  return Source(spec=pattern, weight=weight, paths=tuple(paths),
                kind=manifests[0]["kind"],
                token_dtype=manifests[0]["token_dtype"],
                tokenizer_fingerprint=manifests[0]["tokenizer"]["fingerprint"],
                manifests=tuple(os.path.join(d, records.MANIFEST) for d in by_dir),
                documents=docs,
                file_documents=tuple(int(shards[p]["documents"]) for p in paths),
                file_bytes=tuple(int(shards[p]["bytes"]) for p in paths),
                file_sha256=tuple(str(shards[p]["sha256"]) for p in paths),
                cache=storage.cache_dir(cache))


def resolve_all(spec: str, split: str, *, setting: str, fingerprint: str | None,
                cache: str = "") -> list[Source]:
  """Every source of `spec` ("" = the demo corpus), checked against the tokenizer fingerprint."""
  items = parse_sources(spec) or [("", 1.0)]
  sources = [resolve(p, w, split, setting=setting, cache=cache) for p, w in items]
  for s in sources:
    if fingerprint is not None and s.tokenizer_fingerprint != fingerprint:
      raise ValueError(
          f"{setting}: {s.manifests[0]} was prepared with tokenizer fingerprint "
          f"{s.tokenizer_fingerprint}, but config.data.tokenizer has fingerprint {fingerprint}; "
          "set config.data.tokenizer to the tokenizer given to prepare (or re-prepare the data)")
  kinds = {s.kind for s in sources}
  if "preference" in kinds and len(kinds) > 1:
    pairs = next(s.spec for s in sources if s.kind == "preference")
    other = next(s for s in sources if s.kind != "preference")
    raise ValueError(f"{setting}: {pairs!r} holds preference pairs and {other.spec!r} "
                     f"{other.kind} data: a run reads one kind (DPO trains on pairs only)")
  if len(kinds) > 1:
    raise ValueError(f"{setting}: cannot mix pretraining and SFT sources in one run")
  return sources
