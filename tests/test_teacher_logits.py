"""Offline top-k distillation: `maxgemma.teacher_logits` writes what the teacher says, resumes
and splits over processes without changing a byte, the pipeline packs each position's stored ids
with its own token, bad input is one line, and a student trains on the stored target."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from maxgemma import checkpoint, sharding, teacher_logits
from maxgemma import config as config_lib
from maxgemma.config import base_config
from maxgemma.data import records, topk
from maxgemma.data.pipeline import make_eval_iterator, make_train_iterator
from maxgemma.data.prepare import prepare
from maxgemma.model.gemma import Transformer
from maxgemma.trainer import state as state_lib
from maxgemma.trainer.build import build
from tests.train_utils import env, tiny_config

K = 8
CDF_SLACK = 1e-5  # float32 rounding of the teacher's CDF, as a fraction of its total
SEQ = 16  # teacher chunks and student rows: documents longer than this span several chunks
ROWS = 8  # rows of one unpacked teacher call in the tests (chunks of one document)
N_DOCS = 40


def _doc(i: int) -> str:
  return f"doc {i} " + "alpha beta gamma delta " * (i % 7) + "end"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A prepared dataset of several train and eval shards, a tiny teacher (configs/tiny.py's
  model, embeddings scaled up so its next-token distribution is peaked) and its sampled top-k."""
  root = tmp_path_factory.mktemp("offline")
  src = root / "docs.jsonl"
  src.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(N_DOCS)))
  data = str(root / "data")
  prepare([str(src)], "", data, eval_fraction=0.2, unit_mb=0.0008, workers=1, progress=False)
  cfg = tiny_config()
  model_cfg = config_lib.model_config(cfg)
  params = jax.jit(functools.partial(state_lib.init_params, model_cfg))(jax.random.key(3))
  params["embedder"]["input_embedding"] = params["embedder"]["input_embedding"] * 30.0
  teacher = str(root / "teacher")
  ckpt = checkpoint.Checkpointer(teacher)
  ckpt.save(0, {"params": params}, config=cfg, model_cfg=model_cfg)
  ckpt.close()
  out = str(root / "sampled")
  teacher_logits.run(data, teacher, out, k=K, seq_len=SEQ, batch_tokens=4 * SEQ, seed=5,
                     log=False)
  return {"root": root, "data": data, "teacher": teacher, "sampled": out,
          "params": jax.device_get(params), "model_cfg": model_cfg}


def _files(directory: str) -> dict[str, bytes]:
  return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))
          if os.path.isfile(os.path.join(directory, n))}


def _documents(data: str, shard: str) -> list[np.ndarray]:
  manifest = records.read_manifest(data)
  reader = ArrayRecordReader(os.path.join(data, shard))
  docs = [records.decode_record(r, dtype=manifest["token_dtype"], sft=False)[0]
          for r in reader.read(list(range(reader.num_records())))]
  reader.close()
  return docs


def _stored(out: str, shard: str) -> list[tuple[np.ndarray, np.ndarray]]:
  reader = ArrayRecordReader(os.path.join(out, shard))
  got = [topk.decode(r, K) for r in reader.read(list(range(reader.num_records())))]
  reader.close()
  return got


def _teacher_logits(params, model_cfg, ids: np.ndarray) -> np.ndarray:
  """[n - 1, V] float64 logits of a document: its SEQ-chunks each alone in a row of its own (no
  packing), positions from 0, the row's tail padding (segment 0)."""
  n = len(ids) - 1
  tokens, segments = np.zeros((ROWS, SEQ), np.int32), np.zeros((ROWS, SEQ), np.int32)
  for row, s in enumerate(range(0, n, SEQ)):
    chunk = ids[s:min(s + SEQ, n)]
    tokens[row, :len(chunk)], segments[row, :len(chunk)] = chunk, 1
  positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape)
  logits = _forward(model_cfg)(params, tokens, positions, segments)
  return np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])[:n]


@functools.lru_cache
def _forward(model_cfg):
  model = Transformer(model_cfg)
  return jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, pos, seg))


@functools.partial(jax.jit, static_argnums=(0,))
def _uniforms(seed: int, tag: int, doc: int) -> jax.Array:
  """The [ROWS * SEQ, K] uniforms of positions 0.. of document `doc` of shard `tag`."""
  t = jnp.arange(ROWS * SEQ)
  return teacher_logits.uniforms(seed, tag, jnp.full_like(t, doc), t, K)


def _shards_to_check(data: str) -> list[str]:
  shards = [s for s in records.read_manifest(data)["shards"] if s["documents"]]
  return [shards[0]["file"], next(s["file"] for s in shards if s["split"] == "eval")]


def test_sampled_ids_are_the_teachers_draws(world):
  """Each stored id is the inverse-CDF draw of softmax(logits) at that position's uniform,
  recomputed here from an unpacked teacher forward pass in float64."""
  params, model_cfg = world["params"], world["model_cfg"]
  manifest = topk.read_manifest(world["sampled"])
  assert (manifest["k"], manifest["mode"], manifest["seed"]) == (K, "sample", 5)
  assert manifest["bytes_per_position"] == 6 * K
  checked = 0
  for shard in _shards_to_check(world["data"]):
    docs, stored = _documents(world["data"], shard), _stored(world["sampled"], shard)
    assert len(docs) == len(stored)
    for d in range(min(3, len(docs))):
      logits = _teacher_logits(params, model_cfg, docs[d])
      p = np.exp(logits - logits.max(-1, keepdims=True))
      cdf = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
      n = len(logits)
      u = np.asarray(_uniforms(5, teacher_logits.shard_tag(shard), d), np.float64)
      want = np.stack([np.searchsorted(cdf[t], u[t] * cdf[t, -1], side="right")
                       for t in range(n)])
      ids, weights = stored[d]
      assert ids.shape == (n, K)
      # The teacher ran in float32: where u falls within float32 rounding of a CDF step, the
      # neighbouring id is as right a draw. Every other id must be exactly the float64 draw.
      target_nk = u[:n] * cdf[:, -1:]
      lo_nk = np.where(ids > 0, np.take_along_axis(cdf, np.maximum(ids - 1, 0), -1), 0.0)
      hi_nk = np.take_along_axis(cdf, ids, -1)
      off = ids != want
      assert off.mean() < 0.01, f"{off.sum()} of {off.size} draws differ from float64"
      assert np.all((lo_nk[off] - CDF_SLACK <= target_nk[off])
                    & (target_nk[off] <= hi_nk[off] + CDF_SLACK)), (ids[off], want[off])
      np.testing.assert_array_equal(weights, np.full((n, K), 1 / K, np.float16))
      checked += n
  assert checked > 50


def test_topk_mode_stores_the_most_probable_ids_and_their_probabilities(world, tmp_path):
  out = str(tmp_path / "topk")
  teacher_logits.run(world["data"], world["teacher"], out, k=K, mode="topk", seq_len=SEQ,
                     batch_tokens=4 * SEQ, log=False)
  params, model_cfg = world["params"], world["model_cfg"]
  for shard in _shards_to_check(world["data"]):
    docs, stored = _documents(world["data"], shard), _stored(out, shard)
    for d in range(min(2, len(docs))):
      logits = _teacher_logits(params, model_cfg, docs[d])
      z = logits - logits.max(-1, keepdims=True)
      logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
      want_ids = np.argsort(-logp, axis=-1, kind="stable")[:, :K]
      ids, weights = stored[d]
      np.testing.assert_array_equal(ids, want_ids)
      np.testing.assert_allclose(weights.astype(np.float64),
                                 np.exp(np.take_along_axis(logp, want_ids, -1)), rtol=2e-3,
                                 atol=1e-6)


def test_resume_rewrites_only_the_missing_shard_byte_for_byte(world, tmp_path):
  out = str(tmp_path / "resumed")
  shutil.copytree(world["sampled"], out)
  before = _files(world["sampled"])
  victim = _shards_to_check(world["data"])[0]
  os.remove(os.path.join(out, victim))
  with open(os.path.join(out, victim), "wb") as f:  # half a file left by a killed run
    f.write(before[victim][:100])
  stamps = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in before
            if n not in (victim, records.MANIFEST)}
  teacher_logits.run(world["data"], world["teacher"], out, k=K, seq_len=SEQ,
                     batch_tokens=4 * SEQ, seed=5, log=False)
  assert _files(out) == before
  assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in stamps} == stamps



def test_a_run_killed_mid_way_resumes_to_the_same_shards(world, tmp_path):
  """SIGKILL of a real `python -m maxgemma.teacher_logits` once its first shard is complete (the
  next one being written), then a resumed run: the same files as an uninterrupted run."""
  out = str(tmp_path / "killed")
  progress = os.path.join(out, teacher_logits.PROGRESS_DIR)
  args = [f"--data={world['data']}", f"--teacher={world['teacher']}", f"--out={out}", f"--k={K}",
          f"--seq_len={SEQ}", f"--batch_tokens={4 * SEQ}", "--seed=5", "--quiet"]
  child = subprocess.Popen([sys.executable, "-m", "maxgemma.teacher_logits", *args], env=env(1),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 240
  try:
    while not (os.path.isdir(progress) and len(os.listdir(progress)) >= 2):  # plan + one shard
      assert child.poll() is None, "the writer ended before it could be killed"
      assert time.monotonic() < deadline, "no shard was completed in 240 s"
      time.sleep(0.05)
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  assert not os.path.exists(os.path.join(out, records.MANIFEST))  # it was stopped mid-way
  done = len(os.listdir(progress)) - 1
  assert 1 <= done < len(_files(world["sampled"])) - 1
  teacher_logits.run(world["data"], world["teacher"], out, k=K, seq_len=SEQ,
                     batch_tokens=4 * SEQ, seed=5, log=False)
  assert _files(out) == _files(world["sampled"])

def test_two_processes_write_the_files_of_one(world, tmp_path):
  out = str(tmp_path / "two")
  args = [f"--data={world['data']}", f"--teacher={world['teacher']}", f"--out={out}", f"--k={K}",
          f"--seq_len={SEQ}", f"--batch_tokens={4 * SEQ}", "--seed=5", "--quiet"]
  child_env = {**env(1), "MAXGEMMA_PROCESS_ID": "1", "MAXGEMMA_NUM_PROCESSES": "2"}
  child = subprocess.Popen([sys.executable, "-m", "maxgemma.teacher_logits", *args],
                           env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
  try:
    manifest = teacher_logits.run(world["data"], world["teacher"], out, k=K, seq_len=SEQ,
                                  batch_tokens=4 * SEQ, seed=5, process_index=0,
                                  process_count=2, wait_s=240, log=False)
  finally:
    output, _ = child.communicate(timeout=240)
  assert child.returncode == 0, output
  assert manifest is not None
  assert _files(out) == _files(world["sampled"])
  progress = os.listdir(os.path.join(out, teacher_logits.PROGRESS_DIR))
  assert len(progress) == len(manifest["shards"]) + 1  # one record per shard, plus the plan


def _fake_topk(data: str, out: str, k: int = 4) -> None:
  """Top-k whose ids at position t of document d of shard s are (target token, d, t, s)."""
  manifest = records.read_manifest(data)
  os.makedirs(out)
  shards = []
  for s, shard in enumerate(manifest["shards"]):
    writer = ArrayRecordWriter(os.path.join(out, shard["file"]), "group_size:1")
    for d, ids in enumerate(_documents(data, shard["file"])):
      n = len(ids) - 1
      stored = np.stack([ids[1:], np.full(n, d), np.arange(n), np.full(n, s)], -1)
      writer.write(topk.encode(stored, np.ones((n, k))))
    writer.close()
    shards.append({"file": shard["file"], "documents": shard["documents"]})
  records.write_json_atomic(os.path.join(out, records.MANIFEST), {
      "format": topk.FORMAT, "k": k, "temperature": 1.0, "teacher": {"vocab_size": 2048},
      "data": {"shards": [{k_: s[k_] for k_ in ("file", "documents", "sha256")}
                          for s in manifest["shards"]]},
      "shards": shards})


@pytest.mark.parametrize("packing", [True, False])
def test_packed_teacher_ids_belong_to_the_token_at_their_position(world, tmp_path, packing):
  fake = str(tmp_path / "fake")
  _fake_topk(world["data"], fake)
  docs = {(s, d): ids for s, shard in enumerate(records.read_manifest(world["data"])["shards"])
          for d, ids in enumerate(_documents(world["data"], shard["file"]))}
  cfg = base_config().data
  cfg.update(sources=world["data"], teacher_topk=fake, prefetch=0, packing=packing)
  seen = 0
  for make in (make_train_iterator, make_eval_iterator):
    it = make(cfg, seq_len=SEQ, global_batch=4, seed=0)
    for _ in range(6):
      b = next(it)
      ids, w = b["teacher_ids"], b["teacher_weights"]
      assert ids.shape == w.shape == (4, SEQ, 4) and w.dtype == np.float16
      real = b["segment_ids"] > 0
      assert not ids[~real].any() and not w[~real].any()  # zeros on padding
      np.testing.assert_array_equal(ids[..., 0][real], b["targets"][real])
      assert np.all(w[real] == 1)
      t = ids[..., 2][real]
      assert np.all((t - b["positions"][real]) % SEQ == 0)  # chunks start at multiples of SEQ
      for (s, d), t_, token in zip(ids[..., [3, 1]][real].tolist(), t.tolist(),
                                   b["tokens"][real].tolist(), strict=True):
        assert docs[(s, d)][t_] == token  # the stored id's document has this token there
      seen += int(real.sum())
    it.close()
  assert seen > 200


def test_top_k_of_other_data_is_refused_in_one_line(world, tmp_path):
  fake = str(tmp_path / "fake")
  _fake_topk(world["data"], fake)
  manifest = json.load(open(os.path.join(fake, records.MANIFEST)))
  manifest["data"]["shards"][0]["sha256"] = "0" * 64
  records.write_json_atomic(os.path.join(fake, records.MANIFEST), manifest)
  cfg = base_config().data
  cfg.update(sources=world["data"], teacher_topk=fake, prefetch=0)
  with pytest.raises(ValueError, match="no teacher top-k for .*written for other data") as e:
    make_train_iterator(cfg, seq_len=SEQ, global_batch=4, seed=0)
  assert "\n" not in str(e.value)
  cfg.teacher_topk = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="teacher_logits") as e:
    make_train_iterator(cfg, seq_len=SEQ, global_batch=4, seed=0)
  assert "\n" not in str(e.value)


def test_bad_input_is_one_line_naming_the_fix(world, tmp_path, capsys):
  def fails(*args: str) -> str:
    rc = teacher_logits.main([f"--teacher={world['teacher']}", f"--out={tmp_path / 'o'}",
                              "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err

  assert "--k=4096: must be in [1, 2048]" in fails(f"--data={world['data']}", "--k=4096")
  assert "python -m maxgemma.data.prepare" in fails(f"--data={tmp_path}", "--k=4")
  assert "no checkpoints directory" in fails(f"--data={world['data']}", "--k=4",
                                             f"--teacher={tmp_path}")
  model_cfg = world["model_cfg"]
  data = records.read_manifest(world["data"])
  meta = {"config": {"data": {"tokenizer": ""}}}
  with pytest.raises(teacher_logits.TeacherLogitsError, match="vocabulary \\(1024\\) is not"):
    teacher_logits._check_tokenizer("T", meta, data, dataclasses.replace(model_cfg,
                                                                       vocab_size=1024))
  other = {**data, "tokenizer": {**data["tokenizer"], "fingerprint": "other"}}
  with pytest.raises(teacher_logits.TeacherLogitsError, match="tokenizer .* is not the one"):
    teacher_logits._check_tokenizer("T", meta, other, model_cfg)
  with pytest.raises(teacher_logits.TeacherLogitsError, match="another job .*\\bk\\b"):
    teacher_logits.run(world["data"], world["teacher"], world["sampled"], k=K + 1, seq_len=SEQ,
                       log=False)


def _student_config(world):
  from configs import distill_tiny  # noqa: PLC0415

  cfg = distill_tiny.get_config()  # its distill.teacher is set too: the stored top-k wins
  cfg.data.update(sources=world["data"], teacher_topk=world["sampled"], prefetch=0)
  cfg.train.update(steps=12, seq_len=SEQ, global_batch=8)
  cfg.optim.warmup_steps = 1
  cfg.distill.loss_chunk = 8
  return cfg


def test_the_trainer_picks_the_offline_objective_and_checks_it(world):
  cfg = _student_config(world)
  setup = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  assert type(setup.objective).__name__ == "OfflineDistill" and setup.frozen_abstract == {}
  spec = setup.objective.batch_spec(8, SEQ)
  assert spec["teacher_ids"].shape == spec["teacher_weights"].shape == (8, SEQ, K)
  cfg.distill.temperature = 2.0
  with pytest.raises(ValueError, match="drawn at temperature 1.0; set config.distill.tempera"):
    build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))


@pytest.mark.slow
def test_a_student_learns_the_stored_target(world):
  """configs/distill_tiny.py's student, offline from the stored top-k, on one device, by the
  trainer's own step: the KL to the stored target falls."""
  cfg = _student_config(world)
  setup = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  state, frozen = setup.create_state(seed=0), setup.load_frozen()
  it = make_train_iterator(cfg.data, seq_len=SEQ, global_batch=8, seed=0)
  kl = []
  with setup.scope():
    for _ in range(cfg.train.steps):
      state, metrics = setup.train_step(state, jax.device_put(next(it), setup.batch_sharding),
                                        frozen)
      kl.append(float(metrics["kl"]))
  it.close()
  assert np.mean(kl[-3:]) < np.mean(kl[:3]) - 0.3, kl
