"""Tokenize a corpus into ArrayRecord shards plus a manifest, in parallel and restartably.

  python -m maxgemma.data.prepare --input='corpus/*.jsonl' --tokenizer=tok.model --output=DIR

--kind=pretrain reads a text field, --kind=sft chat `messages`, --kind=preference rows of
`prompt` (or chat `messages`), `chosen` and `rejected` (maxgemma/data/preference.py), one pair
per record.

Each input is cut into units (about --unit_mb each, at document boundaries); a worker turns a
unit into one train (and one eval) shard, written under a temporary name and renamed when
complete, then records it in DIR/.progress/. A re-run skips finished units, so an interrupted
job finishes without duplicating or losing documents. `manifest.json` is written last.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
from typing import Any

from array_record.python.array_record_module import ArrayRecordWriter

from maxgemma import storage
from maxgemma.data import records
from maxgemma.data.readers import BadInputError, BadRecordError, Unit, plan_units, read_unit
from maxgemma.data.tokenizer import Tokenizer, load_tokenizer

PROGRESS_DIR = ".progress"
_BATCH = 256  # documents tokenized per call
_MAX_EXAMPLES = 20  # skipped-record examples kept in the manifest
KINDS = ("pretrain", "sft", "preference")


class PrepareError(ValueError):
  """A problem with the job as a whole (inputs, output directory, tokenizer)."""


def _expand_inputs(patterns: list[str]) -> list[str]:
  files: list[str] = []
  for pattern in (p for item in patterns for p in item.split(",") if p):
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise PrepareError(f"--input={pattern!r} matched no files; check the path or glob")
    files += [os.path.abspath(m) for m in matches]
  if not files:
    raise PrepareError("no --input given")
  return list(dict.fromkeys(files))


def _in_eval(key: str, fraction: float) -> bool:
  """Deterministic, content-based eval assignment (stable across re-runs and worker counts)."""
  if fraction <= 0:
    return False
  h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                     digest_size=8).digest(), "little")
  return h / 2**64 < fraction


# ---------------------------------------------------------------- worker side

_worker: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer, progress: Any) -> None:
  _worker["tok"], _worker["progress"] = tokenizer, progress


def _encode_docs(tok: Tokenizer, kind: str, docs: list[tuple[int, object]], path: str,
                 skip_bad: bool, stats: dict) -> list[tuple[bytes, str, int]]:
  """(record, eval key, tokens) per usable document of a batch."""
  out = []
  dtype = records.token_dtype(tok.vocab_size)
  if kind == "preference":
    from maxgemma.data.preference import encode_pair
    pairs = []
    for line, value in docs:
      try:
        ids = encode_pair(tok, value)
      except ValueError as e:
        _bad(BadRecordError(path, line, str(e)), skip_bad, stats)
        continue
      pairs.append((records.encode_preference(*ids, dtype=dtype),
                    json.dumps(value, sort_keys=True), sum(len(x) for x in ids)))
    return pairs
  if kind == "pretrain":
    texts = []
    for line, value in docs:
      if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        _bad(BadRecordError(path, line, f"text must be a string, got {kind}"),
             skip_bad, stats)
      elif value:
        texts.append(value)
      else:
        stats["empty"] += 1
    for text, ids in zip(texts, tok.encode_batch(texts), strict=True):
      out.append(([tok.bos_id, *ids, tok.eos_id], None, text))
  else:
    from maxgemma.data.sft import encode_chat
    for line, value in docs:
      try:
        ids, mask = encode_chat(tok, value)
      except ValueError as e:
        _bad(BadRecordError(path, line, f"bad chat messages: {e}"), skip_bad, stats)
        continue
      out.append((ids, mask, json.dumps(value, sort_keys=True)))
  return [(records.encode_record(ids, mask, dtype=dtype), key, len(ids))
          for ids, mask, key in out]


def _bad(error: BadRecordError, skip_bad: bool, stats: dict) -> None:
  if not skip_bad:
    raise error
  stats["skipped"] += 1
  if len(stats["examples"]) < _MAX_EXAMPLES:
    stats["examples"].append(str(error))


def _run_unit(task: tuple[int, int, Unit, str, dict]) -> dict:
  """Tokenizes one unit into its shards; returns (and records) the shards' statistics."""
  index, count, unit, output, opts = task
  tok, progress = _worker["tok"], _worker.get("progress")
  splits = ("train", "eval") if opts["eval_fraction"] > 0 else ("train",)
  names = {s: records.shard_name(s, index, count) for s in splits}
  tmp = {s: os.path.join(output, names[s] + ".tmp") for s in splits}
  writers = {s: ArrayRecordWriter(tmp[s], "group_size:1") for s in splits}
  stats: dict[str, Any] = {"skipped": 0, "empty": 0, "examples": []}
  counts = {s: [0, 0] for s in splits}  # documents, tokens
  try:
    batch, nbytes = [], 0
    reader = read_unit(unit, opts["field"], opts["text_docs"])
    for line, value, size in itertools.chain(reader, [(0, None, 0)]):  # 0: flush the last batch
      nbytes += size
      if isinstance(value, BadRecordError):
        _bad(value, opts["skip_bad"], stats)
      elif line:
        batch.append((line, value))
      if len(batch) >= _BATCH or (line == 0 and batch):
        tokens = 0
        encoded = _encode_docs(tok, opts["kind"], batch, unit.path, opts["skip_bad"], stats)
        for data, key, n in encoded:
          split = "eval" if _in_eval(key, opts["eval_fraction"]) else "train"
          writers[split].write(data)
          counts[split][0] += 1
          counts[split][1] += n
          tokens += n
        if progress is not None:
          progress.put((len(batch), tokens, nbytes))
        batch, nbytes = [], 0
  except BaseException:
    for s, w in writers.items():  # a failed unit leaves nothing behind
      w.close()
      os.remove(tmp[s])
    raise
  for w in writers.values():
    w.close()
  shards = []
  for s in splits:
    final = os.path.join(output, names[s])
    os.replace(tmp[s], final)
    shards.append({"file": names[s], "split": s, "documents": counts[s][0],
                   "tokens": counts[s][1], "bytes": os.path.getsize(final),
                   "sha256": storage.sha256_of(final)})
  done = {"unit": index, "input": unit.path, "first_line": unit.first_line, "shards": shards,
          "skipped": stats["skipped"], "empty": stats["empty"],
          "skipped_examples": stats["examples"]}
  records.write_json_atomic(os.path.join(output, PROGRESS_DIR, f"unit-{index:05d}.json"), done)
  return done


# ---------------------------------------------------------------- driver side


class _Progress:
  """Prints documents/s, tokens/s and an ETA (by input bytes) to stderr about once a second."""

  def __init__(self, total_bytes: int, enabled: bool):
    self.total, self.enabled = max(1, total_bytes), enabled
    self.docs = self.tokens = self.bytes = 0
    self.start = self.last = time.monotonic()
    self.tty = sys.stderr.isatty()

  def add(self, docs: int, tokens: int, nbytes: int) -> None:
    self.docs, self.tokens, self.bytes = self.docs + docs, self.tokens + tokens, self.bytes + nbytes
    now = time.monotonic()
    if self.enabled and now - self.last >= (1.0 if self.tty else 10.0):
      self.last = now
      self.show()

  def show(self, end: str = "") -> None:
    dt = max(time.monotonic() - self.start, 1e-9)
    frac = min(1.0, self.bytes / self.total)
    eta = dt * (1 - frac) / frac if frac > 0 else float("nan")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
    line = (f"prepare: {frac:6.1%}  {self.docs:,} docs ({self.docs / dt:,.0f}/s)  "
            f"{self.tokens:,} tokens ({self.tokens / dt:,.0f}/s)  ETA {eta_s}")
    print(("\r" if self.tty else "") + line, end=end or ("" if self.tty else "\n"),
          file=sys.stderr, flush=True)


def _plan(files: list[str], tok: Tokenizer, opts: dict, unit_bytes: int) -> tuple[dict, list]:
  units = [u for f in files for u in plan_units(f, unit_bytes, opts["text_docs"])]
  plan = {
      "inputs": [{"path": f, "bytes": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns}
                 for f in files],
      "tokenizer": {"path": tok.path, "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
      "options": {k: v for k, v in opts.items() if k != "skip_bad"} | {"unit_bytes": unit_bytes},
      "units": len(units),
  }
  return plan, units


def _check_existing(output: str, plan: dict, overwrite: bool) -> dict | None:
  """The finished manifest if `output` already holds this exact job; errors on another job."""
  manifest_path = os.path.join(output, records.MANIFEST)
  plan_path = os.path.join(output, PROGRESS_DIR, "plan.json")
  old = None
  if os.path.isfile(plan_path):
    with open(plan_path) as f:
      old = json.load(f)
  elif os.path.isfile(manifest_path):
    with open(manifest_path) as f:
      old = json.load(f).get("plan")
  if old is None or old == plan:
    if old is not None and os.path.isfile(manifest_path):
      return records.read_manifest(output)
    return None
  if overwrite:
    for name in os.listdir(output):
      if name == PROGRESS_DIR:
        shutil.rmtree(os.path.join(output, name))
      elif name == records.MANIFEST or name.endswith((".array_record", ".array_record.tmp")):
        os.remove(os.path.join(output, name))
    return None
  if old.get("tokenizer", {}).get("fingerprint") != plan["tokenizer"]["fingerprint"]:
    why = (f"tokenizer {plan['tokenizer']['path']} (fingerprint "
           f"{plan['tokenizer']['fingerprint']}) does not match the one {output} was prepared "
           f"with ({old['tokenizer']['path']}, fingerprint {old['tokenizer']['fingerprint']})")
  elif old.get("inputs") != plan["inputs"]:
    why = f"the inputs differ from (or changed since) the job that wrote {output}"
  else:
    why = f"the options differ from the job that wrote {output} ({old.get('options')})"
  raise PrepareError(f"{why}. Use the same --tokenizer/--input/options to finish that job, "
                     "another --output, or --overwrite to start over.")


def prepare(inputs: list[str], tokenizer: str, output: str, *, kind: str = "pretrain",
            text_field: str = "", text_docs: str = "paragraph", eval_fraction: float = 0.0,
            workers: int = 0, unit_mb: float = 64.0, skip_bad: bool = False,
            overwrite: bool = False, progress: bool = True) -> dict:
  """Runs (or finishes) a prepare job; returns the manifest. See the module docstring."""
  if storage.is_remote(output):
    return _prepare_remote(inputs, tokenizer, output, kind=kind, text_field=text_field,
                           text_docs=text_docs, eval_fraction=eval_fraction, workers=workers,
                           unit_mb=unit_mb, skip_bad=skip_bad, overwrite=overwrite,
                           progress=progress)
  if kind not in KINDS:
    raise PrepareError(f"--kind={kind!r}: expected pretrain, sft or preference")
  if kind == "preference" and text_field:
    raise PrepareError(f"--text_field={text_field!r} does not apply to --kind=preference: its "
                       "rows hold 'prompt' (or 'messages'), 'chosen' and 'rejected'")
  if text_docs not in ("paragraph", "line", "file"):
    raise PrepareError(f"--text_docs={text_docs!r}: expected paragraph, line or file")
  if not 0 <= eval_fraction < 1:
    raise PrepareError(f"--eval_fraction={eval_fraction}: expected 0 <= fraction < 1")
  files = _expand_inputs(inputs)
  tok = load_tokenizer(tokenizer)
  field = {"sft": "messages", "preference": ""}.get(kind, "text")  # "": the whole row
  opts = {"kind": kind, "field": text_field or field,
          "text_docs": text_docs, "eval_fraction": eval_fraction, "skip_bad": skip_bad}
  plan, units = _plan(files, tok, opts, max(1, int(unit_mb * 2**20)))
  os.makedirs(os.path.join(output, PROGRESS_DIR), exist_ok=True)
  finished = _check_existing(output, plan, overwrite)
  if finished is not None:
    if progress:
      print(f"prepare: {output} is already complete ({finished['documents']:,} documents)",
            file=sys.stderr)
    return finished
  os.makedirs(os.path.join(output, PROGRESS_DIR), exist_ok=True)
  records.write_json_atomic(os.path.join(output, PROGRESS_DIR, "plan.json"), plan)

  def done_path(i: int) -> str:
    return os.path.join(output, PROGRESS_DIR, f"unit-{i:05d}.json")

  pending = [i for i in range(len(units)) if not os.path.isfile(done_path(i))]
  for name in os.listdir(output):  # leftovers of an interrupted run are never used
    if name.endswith(".tmp"):
      os.remove(os.path.join(output, name))
  tasks = [(i, len(units), units[i], output, opts) for i in pending]
  meter = _Progress(sum(units[i].size for i in pending), progress)
  workers = min(workers or os.cpu_count() or 1, len(tasks))
  if workers <= 1:
    _init_worker(tok, None)
    for task in tasks:
      done = _run_unit(task)
      meter.add(sum(s["documents"] for s in done["shards"]),
                sum(s["tokens"] for s in done["shards"]), task[2].size)
  else:
    _run_parallel(tasks, tok, workers, meter)
  if progress:
    meter.show(end="\n")
  return _write_manifest(output, plan, len(units), done_path)


def _run_parallel(tasks: list, tok: Tokenizer, workers: int, meter: _Progress) -> None:
  ctx = mp.get_context("spawn")
  progress = ctx.Queue()
  with ctx.Pool(workers, initializer=_init_worker, initargs=(tok, progress)) as pool:
    results = [pool.apply_async(_run_unit, (task,)) for task in tasks]
    while results:
      try:
        while True:
          meter.add(*progress.get(timeout=0.2))
      except queue.Empty:
        pass
      for r in [r for r in results if r.ready()]:
        results.remove(r)
        r.get()  # re-raises a worker's error here
    pool.close()
    pool.join()
  try:
    while True:
      meter.add(*progress.get_nowait())
  except queue.Empty:
    pass


def _write_manifest(output: str, plan: dict, count: int, done_path) -> dict:
  dones = []
  for i in range(count):
    with open(done_path(i)) as f:
      dones.append(json.load(f))
  shards = [s for d in dones for s in d["shards"]]
  splits = {s: {"documents": sum(x["documents"] for x in shards if x["split"] == s),
                "tokens": sum(x["tokens"] for x in shards if x["split"] == s)}
            for s in sorted({x["split"] for x in shards})}
  documents = sum(v["documents"] for v in splits.values())
  skipped = sum(d["skipped"] for d in dones)
  if documents == 0:
    raise PrepareError(f"no documents in the inputs ({len(plan['inputs'])} files"
                       f"{f', {skipped} bad records skipped' if skipped else ''}): "
                       "check --input, --text_field and --text_docs")
  manifest = {
      "format": records.FORMAT, "kind": plan["options"]["kind"],
      "token_dtype": records.token_dtype(plan["tokenizer"]["vocab_size"]),
      "tokenizer": plan["tokenizer"], "documents": documents,
      "tokens": sum(v["tokens"] for v in splits.values()), "splits": splits,
      "skipped": skipped, "empty": sum(d["empty"] for d in dones),
      "skipped_examples": [e for d in dones for e in d["skipped_examples"]][:_MAX_EXAMPLES],
      "shards": shards, "plan": plan,
  }
  records.write_json_atomic(os.path.join(output, records.MANIFEST), manifest)
  return manifest


def _prepare_remote(inputs: list[str], tokenizer: str, output: str, **kwargs) -> dict:
  """`prepare` into a bucket: the job runs in a local staging directory (restartable like any
  other), then the shards are uploaded and the manifest last, so the remote directory is a
  dataset only once it is complete."""
  staging = os.path.join(storage.cache_dir(), "prepare",
                         hashlib.sha256(output.encode()).hexdigest()[:16])
  remote_manifest = storage.path(output) / records.MANIFEST
  if remote_manifest.is_file() and not kwargs.get("overwrite"):
    if not os.path.isfile(os.path.join(staging, records.MANIFEST)):
      raise PrepareError(f"{output} already holds a prepared dataset; pass --overwrite to replace "
                         "it or choose another --output")
  manifest = prepare(inputs, tokenizer, staging, **kwargs)
  for shard in manifest["shards"]:
    storage.upload_file(os.path.join(staging, shard["file"]), storage.join(output, shard["file"]))
  storage.upload_file(os.path.join(staging, records.MANIFEST),
                      storage.join(output, records.MANIFEST))
  return manifest


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (2 on bad input)."""
  p = argparse.ArgumentParser(prog="python -m maxgemma.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", action="append", required=True,
                 help="glob(s) of .txt/.md, .jsonl or .parquet files (repeat or comma-separate)")
  p.add_argument("--tokenizer", default="", help="SentencePiece .model ('' = demo tokenizer)")
  p.add_argument("--output", required=True,
                 help="output directory, local or gs:// (prepared locally, then uploaded)")
  p.add_argument("--kind", default="pretrain", choices=KINDS,
                 help="pretrain: text; sft: chat messages; preference: prompt (or messages), "
                 "chosen and rejected per row")
  p.add_argument("--text_field", default="",
                 help="JSONL/Parquet field (default: text; messages for --kind=sft)")
  p.add_argument("--text_docs", default="paragraph", choices=("paragraph", "line", "file"),
                 help="plain text: one document per blank-line-separated paragraph/line/file")
  p.add_argument("--eval_fraction", type=float, default=0.0,
                 help="fraction of documents (by content hash) written to eval-* shards")
  p.add_argument("--workers", type=int, default=0, help="worker processes (0 = all cores)")
  p.add_argument("--unit_mb", type=float, default=64.0, help="input MB per output shard")
  p.add_argument("--skip_bad", action="store_true",
                 help="skip bad records (counted in the manifest) instead of stopping")
  p.add_argument("--overwrite", action="store_true", help="discard an unfinished other job")
  p.add_argument("--quiet", action="store_true", help="no progress output")
  a = p.parse_args(argv)
  try:
    m = prepare(a.input, a.tokenizer, a.output, kind=a.kind, text_field=a.text_field,
                text_docs=a.text_docs, eval_fraction=a.eval_fraction, workers=a.workers,
                unit_mb=a.unit_mb, skip_bad=a.skip_bad, overwrite=a.overwrite,
                progress=not a.quiet)
  except BadRecordError as e:
    print(f"prepare: error: {e}. Fix the record, or re-run with --skip_bad to skip and count "
          "bad records; finished shards are kept and the re-run resumes.", file=sys.stderr)
    return 2
  except (BadInputError, PrepareError, FileNotFoundError, ValueError) as e:
    print(f"prepare: error: {e}", file=sys.stderr)
    return 2
  print(f"prepare: wrote {a.output}: {m['documents']:,} documents, {m['tokens']:,} tokens, "
        f"{len(m['shards'])} shards, {m['skipped']} skipped", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
