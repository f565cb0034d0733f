"""The grain input pipeline: loader shards of shuffled, packed, mixed rows, batched and prefetched.

The global batch of B rows is made by S loader shards (`config.data.loader_shards`, 0 = one per
row), shard j giving rows [j*B/S, (j+1)*B/S) of every step. Each loader shard is a pipeline of
its own over its own documents (whole shard files when there are at least S files, else every
m-th document of one file): a seeded permutation per epoch of its documents (`shuffle.permute`)
-> ArrayRecord reads in groups of 64 -> next-token chunks of at most seq_len (targets never
cross documents) -> (worker-process prefetch of groups, order kept) -> grain packing into rows
(segment_ids, positions) -> sources mixed row by row by weight (grain mix) -> B/S rows per step.
With `config.data.teacher_topk` (offline distillation, `maxgemma.data.topk`) each document's
aligned teacher record is read beside it and cut into the same chunks, packed with them, so every
position's `teacher_ids` / `teacher_weights` [K] belong to that position's token.
A preference source (`kind: preference`, pairs for DPO) gives one pair per row instead, laid out
by `maxgemma.data.preference.pack_pair` (never packed with other pairs); a pair that does not fit
seq_len is dropped and counted (`stats()["dropped_pairs"]`, logged when the first is dropped).
A process runs only the loader shards its devices' rows need (`maxgemma.feed` plans which) and
gets their rows concatenated in shard order, prefetched in a thread.

So the global batch at step s is a pure function of (seed, data config, global batch, loader
shards, s): the same for any number of processes, devices or mesh shape, and a checkpoint holds
one position per loader shard, which any process count can resume from.
"""

from __future__ import annotations

import atexit
import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags, logging
from array_record.python.array_record_module import ArrayRecordReader

from maxgemma.data import preference, records, topk
from maxgemma.data.shuffle import permute
from maxgemma.data.sources import Source, resolve_all
from maxgemma.data.tokenizer import load_tokenizer

__all__ = ["DataIterator", "loader_shard_count", "make_eval_iterator", "make_train_iterator",
           "shard_documents", "source_kinds"]

_MAX_FAN_OUT = 1 << 20  # chunks per document (grain's flat-map bound)


_READ_GROUP = 64  # documents read and chunked per pipeline element (amortizes grain overhead)
_GROUPS = 1 << 48  # "infinite" number of groups


@dataclasses.dataclass(frozen=True)
class _Chunker:
  """Record bytes -> list of [n <= seq_len, 3] int32 (token, target, loss mask) chunks.

  Targets are the next token of the same document, so no target crosses documents; a document
  longer than seq_len + 1 continues in the next chunk (positions restart there).
  """
  seq_len: int
  dtype: str
  sft: bool

  def __call__(self, data: bytes, teacher: bytes | None = None, k: int = 0,
               where: str = "") -> list[np.ndarray] | list[dict[str, np.ndarray]]:
    """With `teacher` (the document's aligned top-k record, `maxgemma.data.topk`) every chunk is
    a dict: `seq` and the same positions' `teacher_ids` / `teacher_weights` [n, k]."""
    ids, mask = records.decode_record(data, dtype=self.dtype, sft=self.sft)
    n = len(ids) - 1
    if n <= 0:
      return []
    rows = np.empty((n, 3), np.int32)
    rows[:, 0], rows[:, 1] = ids[:-1], ids[1:]
    rows[:, 2] = mask[1:] if mask is not None else 1
    starts = range(0, n, self.seq_len)
    if teacher is None:
      return [rows[s:s + self.seq_len] for s in starts]
    t_ids, t_weights = topk.decode(teacher, k)
    if len(t_ids) != n:
      raise ValueError(f"{where}: the teacher top-k record holds {len(t_ids)} positions, the "
                       f"document {n}: config.data.teacher_topk was not written for this data")
    return [{"seq": rows[s:s + self.seq_len], "teacher_ids": t_ids[s:s + self.seq_len],
             "teacher_weights": t_weights[s:s + self.seq_len]} for s in starts]


def shard_documents(file_documents: Sequence[int], shard: int, shards: int
                    ) -> tuple[tuple[int, int, int, int], ...]:
  """The documents of loader shard `shard` of `shards`, as (file, first, stride, count) runs.

  With at least as many files as loader shards, shard j reads whole files j, j+S, j+2S, ...;
  with fewer, the m shards sharing file j % N read every m-th of its documents, from j // N.
  """
  n = len(file_documents)
  if n >= shards:
    return tuple((f, 0, 1, int(file_documents[f])) for f in range(shard, n, shards))
  f = shard % n
  share = len(range(f, shards, n))
  first = shard // n
  return ((f, first, share, len(range(first, int(file_documents[f]), share))),)


@dataclasses.dataclass(frozen=True)
class _Order:
  """Which documents a loader shard reads, in order: a pure function of the group number.

  The shard's p-th document is position j of epoch e (divmod(p, n)); each epoch is the seeded
  permutation `permute(., n, seed(e))` of the shard's n documents (or the identity), mapped to
  (file, record) through the shard's runs.
  """
  runs: tuple[tuple[int, int, int, int], ...]
  seed: int | None  # None: no shuffle

  @property
  def n(self) -> int:
    return sum(r[3] for r in self.runs)

  def __call__(self, group: int) -> tuple[np.ndarray, np.ndarray]:
    p = np.arange(group * _READ_GROUP, (group + 1) * _READ_GROUP, dtype=np.int64)
    epoch, j = np.divmod(p, self.n)
    if self.seed is not None:
      for e in np.unique(epoch).tolist():
        at = epoch == e
        j[at] = permute(j[at], self.n, _seed(self.seed, e))
    starts = np.cumsum([0] + [r[3] for r in self.runs])
    run = np.searchsorted(starts, j, side="right") - 1
    table = np.asarray(self.runs, dtype=np.int64)
    files = table[run, 0]
    records_ = table[run, 1] + table[run, 2] * (j - starts[run])
    return files, records_


class _ReadChunks:
  """Group number -> the chunks of that group's documents, in order (one pipeline element).

  Reads with ArrayRecord directly (random access, no read-ahead): about 3x cheaper per record
  than grain's data source, which matters for short documents. Only the files of this loader
  shard are opened (and, for a remote source, fetched).
  """

  def __init__(self, source: Source, order: _Order, chunker: _Chunker,
               teacher: topk.Aligned | None = None):
    self.source, self.order, self.chunker, self.teacher = source, order, chunker, teacher
    self._readers: dict[int, ArrayRecordReader] = {}
    self._teacher_readers: dict[int, ArrayRecordReader] = {}

  def __getstate__(self) -> dict:  # worker processes open their own readers
    return {"source": self.source, "order": self.order, "chunker": self.chunker,
            "teacher": self.teacher}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["source"], state["order"], state["chunker"], state.get("teacher"))

  def _open(self, readers: dict, f: int, path, mismatch) -> ArrayRecordReader:
    """File f's reader, opened once from `path()` (asked only then: a remote file is fetched
    there); `mismatch(records)` is the error when it does not hold the manifest's count."""
    if f not in readers:
      reader = ArrayRecordReader(path(), "readahead_buffer_size:0")
      if reader.num_records() != self.source.file_documents[f]:
        raise ValueError(mismatch(reader.num_records()))
      readers[f] = reader
    return readers[f]

  def _teacher_reader(self, f: int) -> ArrayRecordReader:
    path, documents = self.teacher.paths[f], self.source.file_documents[f]
    return self._open(self._teacher_readers, f, lambda: path, lambda n: (
        f"{path}: holds {n} records, {self.source.paths[f]} {documents}: "
        "config.data.teacher_topk was not written for this data (or was replaced); write it again"))

  def _reader(self, f: int) -> ArrayRecordReader:
    return self._open(self._readers, f, lambda: self.source.local_path(f), lambda n: (
        f"{self.source.paths[f]}: holds {n} records, the manifest says "
        f"{self.source.file_documents[f]} (file replaced?): prepare the dataset again"))

  def __call__(self, group: int) -> list[np.ndarray]:
    files, recs = self.order(group)
    out = []
    for f, r in zip(files.tolist(), recs.tolist(), strict=True):
      data = self._reader(f).read([r])[0]
      if self.teacher is None:
        out += self.chunker(data)
      else:
        out += self.chunker(data, self._teacher_reader(f).read([r])[0], self.teacher.k,
                            f"{self.source.paths[f]} record {r}")
    return out


@dataclasses.dataclass(frozen=True)
class _PairRow:
  """Preference record bytes -> its row (`preference.pack_pair`) in the packer's form (`seq`
  [L, 3] token, target, loss weight; `seq_segment_ids`, `seq_positions`), or None when the pair
  does not fit in seq_len."""
  seq_len: int
  dtype: str

  def __call__(self, data: bytes) -> dict[str, np.ndarray] | None:
    row = preference.pack_pair(*records.decode_preference(data, dtype=self.dtype), self.seq_len)
    if row is None:
      return None
    seq = np.stack([row["tokens"], row["targets"], row["loss_weights"].astype(np.int32)], -1)
    return {"seq": seq, "seq_segment_ids": row["segment_ids"], "seq_positions": row["positions"]}

  def length(self, data: bytes) -> int:
    return preference.pair_length(*records.decode_preference(data, dtype=self.dtype))


class _ReadPairs(_ReadChunks):
  """Group number -> the rows of that group's preference pairs that fit, in order. A row's
  `dropped` counts the pairs dropped just before it (the last row also those after it)."""

  def __call__(self, group: int) -> list[dict[str, np.ndarray]]:
    files, recs = self.order(group)
    rows, dropped, shortest = [], 0, 1 << 62
    for f, r in zip(files.tolist(), recs.tolist(), strict=True):
      data = self._reader(f).read([r])[0]
      row = self.chunker(data)
      if row is None:
        dropped, shortest = dropped + 1, min(shortest, self.chunker.length(data))
        continue
      rows.append({**row, "dropped": np.int32(dropped)})
      dropped = 0
    if not rows:
      raise ValueError(f"{self.source.spec}: none of {len(files)} preference pairs in a row fits "
                       f"train.seq_len={self.chunker.seq_len} (the shortest needs {shortest} "
                       "slots: twice the prompt plus both answers, less 2): raise "
                       "config.train.seq_len")
    rows[-1]["dropped"] += np.int32(dropped)
    return rows


class _Flatten(grain.experimental.FlatMapTransform):
  max_fan_out = _MAX_FAN_OUT

  def flat_map(self, element: list[np.ndarray]) -> list[np.ndarray]:
    return element


def _as_packed(chunk: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return chunk if isinstance(chunk, dict) else {"seq": chunk}


_TEACHER_KEYS = ("teacher_ids", "teacher_weights")


@dataclasses.dataclass(frozen=True)
class _PadRow:
  """Unpacked mode: one chunk per row, padded (segment id 0, zero weight)."""
  seq_len: int

  def __call__(self, chunk: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    parts = _as_packed(chunk)
    n = len(parts["seq"])
    out = {}
    for key, x in parts.items():
      out[key] = np.zeros((self.seq_len, *x.shape[1:]), x.dtype)
      out[key][:n] = x
    seg = np.zeros(self.seq_len, np.int32)
    seg[:n] = 1
    pos = np.zeros(self.seq_len, np.int32)
    pos[:n] = np.arange(n, dtype=np.int32)
    return {**out, "seq_segment_ids": seg, "seq_positions": pos}


def _finalize(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  seq = batch["seq"]
  seg = batch["seq_segment_ids"].astype(np.int32)
  out = {
      "tokens": np.ascontiguousarray(seq[..., 0]),
      "targets": np.ascontiguousarray(seq[..., 1]),
      "positions": np.ascontiguousarray(batch["seq_positions"].astype(np.int32)),
      "segment_ids": seg,
      "loss_weights": (seq[..., 2] * (seg > 0)).astype(np.float32),
  }
  if "dropped" in batch:  # preference rows: pairs dropped before each (DataIterator counts them)
    out["dropped"] = batch["dropped"]
  for key in _TEACHER_KEYS:
    if key in batch:  # zeros on padding, whatever the packer left there
      out[key] = np.where((seg > 0)[..., None], batch[key], 0).astype(batch[key].dtype)
  return out


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _rows(source: Source, index: int, shard: int, shards: int, data_cfg: Any, *, seq_len: int,
          seed: int, train: bool, teacher: topk.Aligned | None = None) -> grain.IterDataset:
  """Packed (or padded) rows of one source for loader shard `shard` of `shards`."""
  runs = shard_documents(source.file_documents, shard, shards)
  if sum(r[3] for r in runs) == 0:
    raise ValueError(f"{source.spec}: loader shard {shard} of {shards} gets no documents "
                     f"({len(source.paths)} file(s), {source.documents} documents): set "
                     "config.data.loader_shards to a smaller divisor of train.global_batch")
  shuffle_seed = _seed(seed, index, shard, 0) if train and data_cfg.shuffle else None
  order = _Order(runs, shuffle_seed)
  pairs = source.kind == "preference"
  if pairs:
    read = _ReadPairs(source, order, _PairRow(seq_len, source.token_dtype))
  else:
    read = _ReadChunks(source, order, _Chunker(seq_len, source.token_dtype, source.kind == "sft"),
                       teacher)
  # Infinite: group g holds the shard's documents g*G .. g*G+G-1 (epochs follow each other).
  ds = grain.MapDataset.range(_GROUPS).map(read)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
  if data_cfg.worker_count > 0:  # 1:1 stage: workers' round-robin output keeps the order
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags when starting workers
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
  it = grain.experimental.FlatMapIterDataset(it, _Flatten())
  if pairs:  # one pair per row, already laid out
    return it
  if not data_cfg.packing:
    return it.map(_PadRow(seq_len))
  packer = {"best_fit": grain.experimental.BestFitPackIterDataset,
            "first_fit": grain.experimental.FirstFitPackIterDataset}.get(data_cfg.packing_method)
  if packer is None:
    raise ValueError(f"config.data.packing_method={data_cfg.packing_method!r}: expected "
                     "best_fit or first_fit")
  lengths = {"seq": seq_len} | ({k: seq_len for k in _TEACHER_KEYS} if teacher else {})
  return packer(it.map(_as_packed), length_struct=lengths,
                num_packing_bins=int(data_cfg.packing_bins), seed=_seed(seed, index, shard, 1),
                shuffle_bins=train and data_cfg.shuffle)


class _ConcatShards(grain.IterDataset):
  """Loader shards side by side: each step, every shard's rows concatenated in shard order."""

  def __init__(self, shards: dict[int, grain.IterDataset]):
    super().__init__(list(shards.values()))
    self._ids = list(shards)

  def __iter__(self) -> _ConcatShardsIterator:
    return _ConcatShardsIterator(self._ids, [iter(p) for p in self._parents])


class _ConcatShardsIterator(grain.DatasetIterator):

  def __init__(self, ids: list[int], parents: list[grain.DatasetIterator]):
    super().__init__(parents)
    self._ids = ids

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(p) for p in self._parents]
    return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {"shards": {str(i): p.get_state() for i, p in zip(self._ids, self._parents,
                                                                strict=True)}}

  def set_state(self, state: dict[str, Any]) -> None:
    for i, p in zip(self._ids, self._parents, strict=True):
      p.set_state(state["shards"][str(i)])

  def close(self) -> None:
    for p in self._parents:
      p.close()


# Settings the data stream depends on: the meta key, and the config key to name in errors.
_STREAM_KEYS = {
    "split": "the iterator split", "seed": "config.train.seed", "seq_len": "config.train.seq_len",
    "global_batch": "config.train.global_batch", "loader_shards": "config.data.loader_shards",
    "sources": "config.data.sources / eval_sources", "shuffle": "config.data.shuffle",
    "packing": "config.data.packing", "packing_method": "config.data.packing_method",
    "packing_bins": "config.data.packing_bins", "worker_count": "config.data.worker_count",
    "teacher_topk": "config.data.teacher_topk",
}


class DataIterator(grain.DatasetIterator):
  """The rows of some loader shards, step by step; checkpointable per loader shard.

  `shards` are the loader shards this iterator runs (ascending); each step gives their
  `global_batch / loader_shards` rows each, concatenated in that order. `get_state` /
  `set_state` (JSON-able dicts) hold one position per loader shard and the settings the stream
  depends on, so restoring into an iterator made with other settings fails loudly.
  """

  def __init__(self, parent: grain.DatasetIterator, meta: dict, sources: list[Source],
               shards: tuple[int, ...]):
    super().__init__(parent)
    self.meta = meta
    self.sources = sources
    self.shards = shards
    self.owned = shards  # the loader shards whose position this process writes to checkpoints
    self._stats = {"batches": 0, "tokens": 0, "slots": 0}
    self._closed_once = False
    atexit.register(_close_if_alive, weakref.ref(self))  # stop prefetch threads before teardown

  @property
  def loader_shards(self) -> int:
    return self.meta["loader_shards"]

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    if "dropped" in batch:
      dropped = self._stats.get("dropped_pairs", 0)
      self._stats["dropped_pairs"] = dropped + int(np.sum(batch.pop("dropped")))
      if not dropped and self._stats["dropped_pairs"]:
        logging.warning("%s: preference pairs that do not fit train.seq_len=%d are dropped "
                        "(counted in the data iterator's stats()['dropped_pairs'])",
                        self.meta["split"], self.meta["seq_len"])
    self._stats["batches"] += 1
    self._stats["tokens"] += int(np.count_nonzero(batch["segment_ids"]))
    self._stats["slots"] += batch["segment_ids"].size
    return batch

  @property
  def packing_efficiency(self) -> float:
    """Fraction of row slots holding real tokens (not padding) in the batches so far."""
    return self._stats["tokens"] / max(1, self._stats["slots"])

  def stats(self) -> dict[str, float]:
    """Batches and non-padding tokens delivered so far and the packing efficiency (preference
    data: also `dropped_pairs`, the pairs skipped for not fitting seq_len)."""
    return {**self._stats, "packing_efficiency": self.packing_efficiency}

  def get_state(self) -> dict[str, Any]:
    """{"meta", "stats", "shards": {"j": position of loader shard j}}."""
    return {"meta": self.meta, "stats": dict(self._stats),
            "shards": self._parent.get_state()["shards"]}

  def check_meta(self, saved: dict[str, Any], where: str = "the saved data state") -> None:
    """Raises one line naming every stream setting that differs from `saved`."""
    diff = [f"{k}: saved {saved.get(k)!r}, now {v!r} ({_STREAM_KEYS.get(k, k)})"
            for k, v in self.meta.items() if k in _STREAM_KEYS and saved.get(k) != v]
    if diff:
      raise ValueError(f"cannot continue the data stream of {where}: it was made with other "
                       f"data settings ({'; '.join(diff)}); set them back to the saved values, "
                       "or train in a new workdir")

  def set_state(self, state: dict[str, Any]) -> None:
    self.check_meta(state["meta"])
    missing = [j for j in self.shards if str(j) not in state["shards"]]
    if missing:
      raise ValueError(f"the saved data state has no position for loader shard(s) {missing}")
    self._parent.set_state({"shards": {str(j): state["shards"][str(j)] for j in self.shards}})
    self._stats = dict(state.get("stats", self._stats))

  def close(self) -> None:
    """Stops prefetch threads and worker processes (also done at exit)."""
    if not self._closed_once:
      self._closed_once = True
      self._parent.close()
      super().close()


def _close_if_alive(ref: weakref.ref) -> None:
  """At exit: closes the iterator tree, then makes `close` a no-op so that grain's `__del__`
  does not run it again during interpreter teardown (when module globals are gone)."""
  iterator = ref()
  if iterator is None:
    return
  iterator.close()
  todo = [iterator]
  while todo:
    it = todo.pop()
    it.close = _noop
    todo.extend(getattr(it, "_parents", ()))


def _noop() -> None:
  pass


def loader_shard_count(data_cfg: Any, global_batch: int) -> int:
  """`config.data.loader_shards` resolved (0 = one per row); it must divide the global batch."""
  shards = int(data_cfg.get("loader_shards", 0)) or int(global_batch)
  if shards < 1 or global_batch % shards:
    divisors = [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if global_batch % d == 0]
    raise ValueError(f"config.data.loader_shards={shards} must divide train.global_batch="
                     f"{global_batch} (each loader shard gives global_batch / loader_shards rows "
                     f"per step): use 0 (one per row) or a divisor such as {divisors[-1]}")
  return shards


def teacher_topk(data_cfg: Any, sources: Sequence[Source]) -> list[topk.Aligned | None]:
  """Per source, the `config.data.teacher_topk` files aligned with its token files (None each
  when unset); refuses top-k written for other data, or of another k, in one line."""
  spec = str(data_cfg.get("teacher_topk", "") or "")
  if not spec:
    return [None] * len(sources)
  aligned = [topk.align(spec, list(zip(s.paths, s.file_documents, s.file_sha256, strict=True)))
             for s in sources]
  if len({a.k for a in aligned}) > 1:
    raise ValueError(f"config.data.teacher_topk={spec}: the sources' top-k differ in k")
  return aligned


def source_kinds(data_cfg: Any, *, eval_sources: bool = False) -> set[str]:
  """The kinds (pretrain, sft, preference) of `config.data.sources`' (or `eval_sources`')
  prepared data, read from their manifests (a mix of preference and other data is refused in one
  line)."""
  setting = "config.data.eval_sources" if eval_sources else "config.data.sources"
  spec = data_cfg.eval_sources if eval_sources else data_cfg.sources
  return {s.kind for s in resolve_all(spec, "train", setting=setting, fingerprint=None,
                                      cache=data_cfg.get("cache_dir", ""))}


def _make(data_cfg: Any, *, split: str, seq_len: int, global_batch: int, seed: int,
          shards: Sequence[int] | None) -> DataIterator:
  if seq_len < 1 or global_batch < 1:
    raise ValueError(f"train.seq_len={seq_len} and train.global_batch={global_batch} must be >= 1")
  count = loader_shard_count(data_cfg, global_batch)
  shards = tuple(range(count)) if shards is None else tuple(sorted(int(j) for j in shards))
  if not shards or not all(0 <= j < count for j in shards) or len(set(shards)) != len(shards):
    raise ValueError(f"loader shards {list(shards)} are not distinct indices in [0, {count})")
  train = split == "train"
  spec = data_cfg.sources if train else (data_cfg.eval_sources or data_cfg.sources)
  setting = "config.data.sources" if train or not data_cfg.eval_sources else \
      "config.data.eval_sources"
  # eval_sources "" means the eval split of the training sources.
  want = "train" if train or data_cfg.eval_sources else "eval"
  fingerprint = load_tokenizer(data_cfg.tokenizer).fingerprint
  sources = resolve_all(spec, want, setting=setting, fingerprint=fingerprint,
                        cache=data_cfg.get("cache_dir", ""))
  if sources[0].kind == "preference" and data_cfg.get("teacher_topk", ""):
    raise ValueError(f"config.data.teacher_topk={data_cfg.teacher_topk}: {setting} holds "
                     "preference pairs, which take no teacher; unset one of them")
  teachers = teacher_topk(data_cfg, sources)
  per_shard = {}
  for j in shards:
    rows = [_rows(s, i, j, count, data_cfg, seq_len=seq_len, seed=seed, train=train, teacher=t)
            for (i, s), t in zip(enumerate(sources), teachers, strict=True)]
    ds = rows[0] if len(rows) == 1 else grain.IterDataset.mix(rows, [s.weight for s in sources])
    per_shard[j] = ds.batch(global_batch // count, drop_remainder=True)
  ds = _ConcatShards(per_shard).map(_finalize)
  if data_cfg.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data_cfg.prefetch)
  meta = {"split": split, "seed": seed, "seq_len": seq_len, "global_batch": global_batch,
          "loader_shards": count, "sources": spec, "shuffle": bool(data_cfg.shuffle),
          "packing": bool(data_cfg.packing), "packing_method": str(data_cfg.packing_method),
          "packing_bins": int(data_cfg.packing_bins), "worker_count": int(data_cfg.worker_count)}
  if data_cfg.get("teacher_topk", ""):
    meta["teacher_topk"] = str(data_cfg.teacher_topk)
  return DataIterator(iter(ds), meta, sources, shards)


def make_train_iterator(data_cfg: Any, *, seq_len: int, global_batch: int, seed: int,
                        shards: Sequence[int] | None = None) -> DataIterator:
  """Infinite training batches: the rows of loader shards `shards` (default all) of each step.

  With all shards that is the whole `[global_batch, seq_len]` batch; `maxgemma.feed` chooses a
  process's shards. `next()` gives int32 `tokens`, `targets`, `positions`, `segment_ids`
  (1.. per packed document, 0 = padding) and float32 `loss_weights` (preference data: one pair
  per row, segments 1 and 2 its chosen and rejected sides, `preference.pack_pair`); with
  `config.data.teacher_topk` also the stored teacher's int32 `teacher_ids` and float16
  `teacher_weights` [B, L, K] of each position (zeros on padding).
  """
  return _make(data_cfg, split="train", seq_len=seq_len, global_batch=global_batch, seed=seed,
               shards=shards)


def make_eval_iterator(data_cfg: Any, *, seq_len: int, global_batch: int, seed: int,
                       shards: Sequence[int] | None = None) -> DataIterator:
  """Eval batches (same format), unshuffled and repeating: `config.data.eval_sources`, or the
  eval split of `config.data.sources` when that is empty. A fresh iterator gives the same
  batches, so make one per evaluation."""
  return _make(data_cfg, split="eval", seq_len=seq_len, global_batch=global_batch, seed=seed,
               shards=shards)
