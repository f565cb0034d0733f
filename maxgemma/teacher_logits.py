"""Run a teacher once over a prepared dataset and store K ids per token for offline distillation.

  python -m maxgemma.teacher_logits --data=PREPARED_DIR --teacher=TEACHER_WORKDIR --out=DIR \
      --k=K [--mode=sample] [--temperature=1] [--seq_len=0] [--batch_tokens=8192] [--seed=0] \
      [--process_index=I --process_count=P]

Shape letters: B rows, L row length, D teacher d_model, V vocab, K ids per token, N positions,
C chunks, S positions per chunk.

The teacher is TEACHER_WORKDIR's latest complete checkpoint (`maxgemma.checkpoint.load_params`).
Every document of every shard of PREPARED_DIR (train and eval) is read in order, cut into chunks of
at most `--seq_len` (default: the teacher's context) next-token positions as the training pipeline
cuts it (positions restart in each chunk), packed into `--batch_tokens / --seq_len` rows of
`--seq_len` (segment ids keep the chunks apart) and run through the teacher. At position t
(predicting token t + 1), with
p = softmax(logits / temperature):

  --mode=sample (default, Gemma 3's form): K ids drawn with replacement from p, weight 1/K each,
      so the stored target (weights summed per id) is an unbiased estimate of p. The draws are
      inverse-CDF lookups of K uniforms from `jax.random.fold_in(key(seed), shard, document, t)`:
      a pure function of (seed, shard, document, position), whatever the batching or processes.
  --mode=topk: the K most probable ids with their probabilities p (the target renormalises them).

Ids are stored as int32, weights as float16 (`maxgemma.data.topk`: 6 x K bytes per position),
one output shard per token shard under the same name, record i = document i. A shard is written
to a temporary name and renamed when complete, then recorded in DIR/.progress/; a re-run skips
shards whose file still matches that record (size and sha256) and rewrites any other from
scratch. `--process_count` processes (default: launch.local's MAXGEMMA_PROCESS_ID /
MAXGEMMA_NUM_PROCESSES) take every P-th shard; process 0 waits for all shards and writes
`manifest.json` last.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from maxgemma import distributed, storage
from maxgemma.data import records, topk
from maxgemma.loss import output_logits
from maxgemma.model.config import ModelConfig
from maxgemma.model.gemma import Transformer

PROGRESS_DIR = ".progress"
MODES = ("sample", "topk")
_LOGIT_ROWS = 512  # positions whose [S, V] float32 logits exist at once


class TeacherLogitsError(ValueError):
  """Bad input to the job as a whole: one line naming the fix."""


def shard_tag(file_name: str) -> int:
  """The number a shard's draws are keyed by (from its file name: stable across processes)."""
  return zlib.crc32(file_name.encode()) & 0x7FFFFFFF


def uniforms(seed: int, tag: int, doc_N: jax.Array, t_N: jax.Array, k: int) -> jax.Array:
  """[N, K] float32 uniforms in [0, 1) of positions (document doc_N, position t_N) of a shard."""
  base = jax.random.fold_in(jax.random.key(seed), tag)

  def one(d, t):
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(base, d), t), (k,))

  return jax.vmap(one)(doc_N, t_N)


def choose(logits_NV: jax.Array, u_NK: jax.Array, *, k: int, mode: str, temperature: float
           ) -> tuple[jax.Array, jax.Array]:
  """(ids [N, K] int32, weights [N, K] float32) of float32 logits (the module docstring)."""
  logp_NV = jax.nn.log_softmax(logits_NV.astype(jnp.float32) / temperature, axis=-1)
  if mode == "topk":
    logp_NK, ids_NK = jax.lax.top_k(logp_NV, k)
    return ids_NK.astype(jnp.int32), jnp.exp(logp_NK)
  cdf_NV = jnp.cumsum(jnp.exp(logp_NV), axis=-1)
  ids_NK = jax.vmap(lambda c, u: jnp.searchsorted(c, u * c[-1], side="right"))(cdf_NV, u_NK)
  ids_NK = jnp.minimum(ids_NK, logits_NV.shape[-1] - 1).astype(jnp.int32)
  return ids_NK, jnp.full(ids_NK.shape, 1.0 / k, jnp.float32)


@functools.lru_cache(maxsize=4)
def _program(model_cfg: ModelConfig, k: int, mode: str, temperature: float, seed: int):
  """The jitted teacher pass: packed rows -> (ids, weights) [B, L, K]."""
  model = Transformer(model_cfg)

  @jax.jit
  def run(params, tokens_BL, positions_BL, segment_ids_BL, doc_BL, t_BL, tag):
    B, L = tokens_BL.shape
    hidden_BLD = model.apply({"params": params}, tokens_BL, positions_BL, segment_ids_BL,
                             return_hidden=True)
    N = B * L
    S = min(_LOGIT_ROWS, N)
    C = -(-N // S)

    def split(x):
      x = x.reshape(N, *x.shape[2:])
      x = jnp.pad(x, ((0, C * S - N),) + ((0, 0),) * (x.ndim - 1))
      return x.reshape(C, S, *x.shape[1:])

    def chunk(xs):
      h_SD, d_S, t_S = xs
      logits_SV = output_logits(h_SD[None], params["embedder"]["input_embedding"],
                                model_cfg.final_logit_softcap, jnp.dtype(model_cfg.dtype),
                                flatten=model_cfg.flatten_matmuls)[0]
      u_SK = uniforms(seed, tag, d_S, t_S, k)
      return choose(logits_SV, u_SK, k=k, mode=mode, temperature=temperature)

    ids_CSK, w_CSK = jax.lax.map(chunk, (split(hidden_BLD), split(doc_BL), split(t_BL)))
    return (ids_CSK.reshape(C * S, k)[:N].reshape(B, L, k),
            w_CSK.reshape(C * S, k)[:N].reshape(B, L, k))

  return run


class _Rows:
  """B packed rows of L positions being filled with document chunks (first fit)."""

  def __init__(self, B: int, L: int):
    self.B, self.L = B, L
    self.tokens = np.zeros((B, L), np.int32)
    self.positions = np.zeros((B, L), np.int32)
    self.segments = np.zeros((B, L), np.int32)
    self.doc = np.zeros((B, L), np.int32)
    self.t = np.zeros((B, L), np.int32)
    self.fill = [0] * B
    self.count = [0] * B  # chunks per row (their segment ids are 1..count)
    self.placed: list[tuple[int, int, int, int, int]] = []  # row, start, doc, t0, length

  def add(self, tokens: np.ndarray, doc: int, t0: int) -> bool:
    n = len(tokens)
    for b in range(self.B):
      s = self.fill[b]
      if s + n <= self.L:
        self.tokens[b, s:s + n] = tokens
        self.positions[b, s:s + n] = np.arange(n)
        self.count[b] += 1
        self.segments[b, s:s + n] = self.count[b]
        self.doc[b, s:s + n] = doc
        self.t[b, s:s + n] = np.arange(t0, t0 + n)
        self.fill[b] = s + n
        self.placed.append((b, s, doc, t0, n))
        return True
    return False


def write_shard(params: Any, model_cfg: ModelConfig, src: str, dst: str, *, documents: int,
                token_dtype: str, sft: bool, k: int, mode: str, temperature: float, seed: int,
                seq_len: int, batch_tokens: int) -> int:
  """Writes the top-k shard `dst` of token shard `src` (via `dst`.tmp); returns its positions."""
  run = _program(model_cfg, k, mode, temperature, seed)
  tag = shard_tag(os.path.basename(src))
  reader = ArrayRecordReader(src)
  if reader.num_records() != documents:
    raise TeacherLogitsError(f"{src}: holds {reader.num_records()} records, its manifest says "
                             f"{documents}: prepare the dataset again")
  tmp = dst + ".tmp"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  rows = _Rows(max(1, batch_tokens // seq_len), seq_len)
  out: dict[int, list] = {}  # document -> [ids, weights, chunks left]
  state = {"next": 0, "positions": 0}

  def flush_done() -> None:
    while state["next"] in out and out[state["next"]][2] == 0:
      ids, w, _ = out.pop(state["next"])
      writer.write(topk.encode(ids, w))
      state["positions"] += len(ids)
      state["next"] += 1

  def run_rows() -> None:
    nonlocal rows
    if rows.placed:
      ids_BLK, w_BLK = jax.device_get(run(params, rows.tokens, rows.positions, rows.segments,
                                          rows.doc, rows.t, tag))
      for b, s, d, t0, n in rows.placed:
        out[d][0][t0:t0 + n] = ids_BLK[b, s:s + n]
        out[d][1][t0:t0 + n] = w_BLK[b, s:s + n]
        out[d][2] -= 1
    rows = _Rows(rows.B, rows.L)
    flush_done()

  try:
    for first in range(0, documents, 256):
      for d, data in enumerate(reader.read(list(range(first, min(first + 256, documents)))),
                               start=first):
        ids = records.decode_record(data, dtype=token_dtype, sft=sft)[0]
        n = max(len(ids) - 1, 0)
        starts = range(0, n, seq_len)
        out[d] = [np.zeros((n, k), np.int32), np.zeros((n, k), np.float16), len(starts)]
        for s in starts:
          chunk = ids[s:min(s + seq_len, n)]
          if not rows.add(chunk, d, s):
            run_rows()
            rows.add(chunk, d, s)
        flush_done()
    run_rows()
    if state["next"] != documents:
      raise RuntimeError(f"{src}: wrote {state['next']} of {documents} documents")
  except BaseException:
    writer.close()
    os.remove(tmp)
    raise
  finally:
    reader.close()
  writer.close()
  os.replace(tmp, dst)
  return state["positions"]


def _load_teacher(workdir: str) -> tuple[Any, ModelConfig, int, dict]:
  from maxgemma.checkpoint import Checkpointer, load_params  # noqa: PLC0415

  if not storage.path(storage.join(workdir, "checkpoints")).is_dir():
    raise TeacherLogitsError(f"--teacher={workdir}: no checkpoints directory; train the teacher "
                             "there first, or bring one in with python -m maxgemma.import_weights")
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise TeacherLogitsError(f"--teacher={workdir}: no complete checkpoint; train the teacher "
                               "there first, or import one with python -m maxgemma.import_weights")
    meta = ckpt.meta(step)
  finally:
    ckpt.close()
  if not meta.get("model"):
    raise TeacherLogitsError(f"--teacher={workdir}: checkpoint {step} records no model config; "
                             "re-save it with maxgemma.train or maxgemma.import_weights")
  params, model_cfg, step = load_params(workdir, step)
  return params, model_cfg, step, meta


def _check_tokenizer(workdir: str, meta: dict, data: dict, model_cfg: ModelConfig) -> None:
  from maxgemma.convert.workdir_tokenizer import find_tokenizer  # noqa: PLC0415
  from maxgemma.data.tokenizer import load_tokenizer  # noqa: PLC0415

  vocab = int(data["tokenizer"]["vocab_size"])
  found = find_tokenizer(workdir, meta=meta)
  same = None  # whether the teacher's tokenizer is known to be the data's
  if found.path is not None and storage.path(found.path).is_file():
    same = load_tokenizer(found.path).fingerprint == data["tokenizer"]["fingerprint"]
  if same is False:
    raise TeacherLogitsError(
        f"--teacher={workdir}: its tokenizer ({found.origin}) is not the one the data was "
        f"prepared with ({data['tokenizer']['path']}); use a teacher with the data's tokenizer, "
        "or prepare the data with the teacher's")
  # A vocabulary rounded up for sharding is fine when the tokenizer is known to be the same.
  if model_cfg.vocab_size < vocab or (model_cfg.vocab_size != vocab and not same):
    raise TeacherLogitsError(
        f"--teacher={workdir}: the teacher's vocabulary ({model_cfg.vocab_size}) is not the "
        f"data's tokenizer's ({vocab} pieces); use a teacher trained with that tokenizer, or "
        "prepare the data with the teacher's")


def _plan(data_dir: str, data: dict, teacher: str, step: int, model_cfg: ModelConfig, *, k: int,
          mode: str, temperature: float, seed: int, seq_len: int) -> dict:
  return {
      "format": topk.FORMAT,
      "teacher": {"workdir": storage.absolute(teacher), "step": int(step),
                  "vocab_size": int(model_cfg.vocab_size)},
      "k": int(k), "mode": mode, "temperature": float(temperature), "seed": int(seed),
      "seq_len": int(seq_len), "id_dtype": "int32", "weight_dtype": "float16",
      "bytes_per_position": int(k * topk.BYTES_PER_ID),
      "data": {"dir": storage.absolute(data_dir), "documents": int(data["documents"]),
               "tokens": int(data["tokens"]), "tokenizer": data["tokenizer"]["fingerprint"],
               "shards": [{"file": s["file"], "documents": int(s["documents"]),
                           "sha256": s["sha256"]} for s in data["shards"]]},
  }


def _done_path(out: str, name: str) -> str:
  return os.path.join(out, PROGRESS_DIR, name + ".json")


def _complete(out: str, name: str) -> dict | None:
  """The progress record of shard `name` if its file still matches it."""
  try:
    with open(_done_path(out, name)) as f:
      done = json.load(f)
  except FileNotFoundError:
    return None
  path = os.path.join(out, name)
  if (not os.path.isfile(path) or os.path.getsize(path) != done["bytes"]
      or storage.sha256_of(path) != done["sha256"]):
    return None
  return done


def run(data_dir: str, teacher: str, out: str, *, k: int, mode: str = "sample",
        temperature: float = 1.0, seq_len: int = 0, batch_tokens: int = 8192, seed: int = 0,
        process_index: int = 0, process_count: int = 1, wait_s: float = 86400.0,
        log: bool = True) -> dict | None:
  """Writes (or finishes) this process's shards; process 0 also the manifest, which it returns."""
  if storage.is_remote(data_dir) or storage.is_remote(out):
    raise TeacherLogitsError("--data and --out must be local directories (copy the data first)")
  if mode not in MODES:
    raise TeacherLogitsError(f"--mode={mode!r}: expected one of {', '.join(MODES)}")
  if not temperature > 0:
    raise TeacherLogitsError(f"--temperature={temperature}: must be > 0")
  if not 0 <= process_index < process_count:
    raise TeacherLogitsError(f"--process_index={process_index} must be in [0, --process_count="
                             f"{process_count})")
  try:
    data = records.read_manifest(data_dir)
  except FileNotFoundError as e:
    raise TeacherLogitsError(f"--data={data_dir}: {e}") from None
  vocab = int(data["tokenizer"]["vocab_size"])
  if not 0 < k <= vocab:
    raise TeacherLogitsError(f"--k={k}: must be in [1, {vocab}] (the data's vocabulary size)")
  params, model_cfg, step, meta = _load_teacher(teacher)
  _check_tokenizer(teacher, meta, data, model_cfg)
  seq_len = seq_len or model_cfg.max_seq_len
  if seq_len < 1 or seq_len > model_cfg.max_seq_len:
    raise TeacherLogitsError(f"--seq_len={seq_len}: must be in [1, {model_cfg.max_seq_len}] (the "
                             "teacher's context); the student's train.seq_len gives it the "
                             "student's context exactly")
  if batch_tokens < seq_len:
    raise TeacherLogitsError(f"--batch_tokens={batch_tokens}: must be >= --seq_len={seq_len}")
  plan = _plan(data_dir, data, teacher, step, model_cfg, k=k, mode=mode,
               temperature=temperature, seed=seed, seq_len=seq_len)
  os.makedirs(os.path.join(out, PROGRESS_DIR), exist_ok=True)
  plan_path = os.path.join(out, PROGRESS_DIR, "plan.json")
  if os.path.isfile(plan_path):
    with open(plan_path) as f:
      old = json.load(f)
    if old != plan:
      diff = sorted(key for key in plan if old.get(key) != plan[key])
      raise TeacherLogitsError(f"--out={out} holds teacher top-k of another job (differs in "
                               f"{', '.join(diff)}): use another --out, or delete it to start over")
  else:
    records.write_json_atomic(plan_path, plan)
  names = [s["file"] for s in data["shards"]]
  mine = [i for i in range(len(names)) if i % process_count == process_index]
  todo = [i for i in mine if _complete(out, names[i]) is None]
  if todo:  # a stale manifest must not describe shards being rewritten
    try:
      os.remove(os.path.join(out, records.MANIFEST))
    except FileNotFoundError:
      pass
  params = jax.device_put(params)
  for i in todo:
    shard = data["shards"][i]
    start = time.monotonic()
    positions = write_shard(
        params, model_cfg, os.path.join(data_dir, shard["file"]), os.path.join(out, shard["file"]),
        documents=int(shard["documents"]), token_dtype=data["token_dtype"],
        sft=data["kind"] == "sft", k=k, mode=mode, temperature=temperature, seed=seed,
        seq_len=seq_len, batch_tokens=batch_tokens)
    path = os.path.join(out, shard["file"])
    records.write_json_atomic(_done_path(out, shard["file"]), {
        "file": shard["file"], "split": shard["split"], "documents": int(shard["documents"]),
        "positions": positions, "bytes": os.path.getsize(path),
        "sha256": storage.sha256_of(path)})
    if log:
      dt = time.monotonic() - start
      print(f"teacher_logits: {shard['file']}: {shard['documents']:,} documents, "
            f"{positions:,} positions in {dt:.1f}s ({positions / max(dt, 1e-9):,.0f}/s)",
            file=sys.stderr, flush=True)
  if process_index != 0:
    return None
  deadline = time.monotonic() + wait_s
  while True:
    dones = [_complete(out, n) for n in names]
    missing = [n for n, d in zip(names, dones, strict=True) if d is None]
    if not missing:
      break
    if time.monotonic() > deadline:
      raise TimeoutError(f"teacher_logits: {len(missing)} shard(s) still missing after {wait_s}s "
                         f"(e.g. {missing[0]}): run the other processes, or re-run with "
                         "--process_count=1 to write them here")
    time.sleep(0.5)
  manifest = {**plan, "shards": dones,
              "positions": sum(d["positions"] for d in dones),
              "bytes": sum(d["bytes"] for d in dones)}
  records.write_json_atomic(os.path.join(out, records.MANIFEST), manifest)
  if log:
    print(f"teacher_logits: wrote {out}: {len(dones)} shards, {manifest['positions']:,} positions, "
          f"k={k} ({manifest['bytes'] / max(1, manifest['positions']):,.0f} bytes per position)",
          file=sys.stderr)
  return manifest


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (2 on bad input)."""
  p = argparse.ArgumentParser(prog="python -m maxgemma.teacher_logits", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, help="a prepared dataset (maxgemma.data.prepare)")
  p.add_argument("--teacher", required=True, help="the teacher's workdir (its latest checkpoint)")
  p.add_argument("--out", required=True, help="the top-k directory to write")
  p.add_argument("--k", type=int, required=True, help="ids stored per token (Gemma 3: 256)")
  p.add_argument("--mode", default="sample", choices=MODES,
                 help="sample: K draws from the teacher, weight 1/K; topk: the K most probable")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--seq_len", type=int, default=0,
                 help="teacher context per chunk (0: the teacher's max_seq_len; the student's "
                 "train.seq_len gives the teacher the student's context exactly)")
  p.add_argument("--batch_tokens", type=int, default=8192, help="positions per teacher call")
  p.add_argument("--seed", type=int, default=0)
  env = os.environ
  p.add_argument("--process_index", type=int,
                 default=int(env.get(distributed.ENV_PROCESS_ID, "0") or 0))
  p.add_argument("--process_count", type=int,
                 default=int(env.get(distributed.ENV_NUM_PROCESSES, "1") or 1))
  p.add_argument("--wait_s", type=float, default=86400.0,
                 help="process 0: how long to wait for the other processes' shards")
  p.add_argument("--quiet", action="store_true")
  a = p.parse_args(argv)
  try:
    run(a.data, a.teacher, a.out, k=a.k, mode=a.mode, temperature=a.temperature,
        seq_len=a.seq_len, batch_tokens=a.batch_tokens, seed=a.seed,
        process_index=a.process_index, process_count=a.process_count, wait_s=a.wait_s,
        log=not a.quiet)
  except (TeacherLogitsError, TimeoutError) as e:
    print(f"teacher_logits: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
