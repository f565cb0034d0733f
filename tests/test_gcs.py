"""`gs://` workdirs, datasets and tokenizers, against a local GCS server (tests/gcs_utils.py).

The end-to-end test trains two processes with everything in the bucket, resumes there, and must
give the losses of the same run kept on local disk; then exports and samples from the bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from maxgemma import metrics, storage
from maxgemma.data import sources
from tests import gcs_utils
from tests.train_utils import ROOT, env, losses_by_step, run_train

B = f"gs://{gcs_utils.BUCKET}"


@pytest.fixture(scope="module")
def gcs():
  with gcs_utils.emulator() as e:
    yield e


def test_storage_paths_and_text(gcs, tmp_path):
  storage.write_text(f"{B}/t/a.json", '{"x": 1}')
  storage.write_text(str(tmp_path / "d" / "a.json"), '{"x": 2}')
  assert json.loads(storage.path(f"{B}/t/a.json").read_text()) == {"x": 1}
  assert json.loads((tmp_path / "d" / "a.json").read_text()) == {"x": 2}
  assert storage.join(B, "t", "a.json") == f"{B}/t/a.json"
  assert storage.tensorstore_url(f"{B}/t") == f"{B}/t/"
  assert storage.tensorstore_url(str(tmp_path)) == f"file://{tmp_path}/"
  local = tmp_path / "tree"
  (local / "sub").mkdir(parents=True)
  (local / "sub" / "f.bin").write_bytes(b"\x00\x01")
  storage.upload_tree(str(local), f"{B}/tree")
  assert storage.path(f"{B}/tree/sub/f.bin").read_bytes() == b"\x00\x01"


def test_cached_copy_verifies_and_never_keeps_a_bad_file(gcs, tmp_path):
  data = os.urandom(1000)
  storage.path(f"{B}/c/shard").write_bytes(data)
  sha = hashlib.sha256(data).hexdigest()
  cache = str(tmp_path / "cache")
  local = storage.cached_copy(f"{B}/c/shard", size=1000, sha256=sha, cache=cache)
  assert open(local, "rb").read() == data
  storage.path(f"{B}/c/shard").write_bytes(data[:-1] + b"x")  # replaced behind the manifest
  os.remove(local)
  with pytest.raises(ValueError, match="do not match the manifest"):
    storage.cached_copy(f"{B}/c/shard", size=1000, sha256=sha, cache=cache)
  left = [f for _, _, fs in os.walk(cache) for f in fs]
  assert left == []  # neither the bad copy nor a temporary survives


def test_bucket_sources_are_cached_and_globbed(gcs, tmp_path):
  storage.upload_tree(sources.demo_dir(), f"{B}/demo")
  by_dir = sources.resolve(f"{B}/demo", 1.0, "train", setting="s", cache=str(tmp_path))
  by_glob = sources.resolve(f"{B}/demo/train-*.array_record", 1.0, "train", setting="s",
                            cache=str(tmp_path))
  local = sources.resolve("", 1.0, "train", setting="s")
  assert by_dir.documents == by_glob.documents == local.documents
  assert by_dir.paths == by_glob.paths
  assert not os.listdir(tmp_path)  # nothing is fetched before a loader shard reads it
  for f, original in enumerate(local.paths):
    cached = by_dir.local_path(f)
    assert cached.startswith(str(tmp_path))
    assert open(cached, "rb").read() == open(original, "rb").read()
  with pytest.raises(ValueError, match="only the file name may hold wildcards"):
    sources.resolve(f"{B}/de*/train-*.array_record", 1.0, "train", setting="s")


def test_metrics_log_in_a_bucket_appends_across_runs(gcs):
  workdir = f"{B}/metrics-run"
  for steps in ((1, 2), (3,)):
    time.sleep(1.1)  # event files are named after the second they were opened in
    with metrics.MetricsWriter(workdir, console=False, remote_flush_s=3600) as w:
      for s in steps:
        w.write(s, {"loss": float(s)})
      # Nothing is uploaded before the flush interval: one upload per interval, not per step.
      log = storage.path(f"{workdir}/metrics.jsonl")
      assert not log.exists() or len(log.read_text().splitlines()) < 3
  lines = storage.path(f"{workdir}/metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
  events = list(storage.path(f"{workdir}/tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 2 and all(e.stat().length > 0 for e in events)


def test_a_missing_bucket_is_one_clear_line(gcs, tmp_path):
  run = run_train("gs://no-such-bucket/runs/x", "--config.train.steps=2")
  assert run.returncode != 0
  last = run.stderr.strip().splitlines()[-1]
  assert "--workdir=gs://no-such-bucket/runs/x: bucket gs://no-such-bucket does not exist" in last
  assert "gcloud storage buckets create gs://no-such-bucket" in last


@pytest.mark.slow
def test_two_processes_train_resume_export_and_sample_in_a_bucket(gcs, tmp_path):
  """The pod case on one machine: launch.local, 2 processes x 4 devices, with the data, the
  tokenizer and the workdir in the bucket; resumed there, the losses are exactly those of the
  same run kept on local disk (one process); then export and sample read the bucket."""
  storage.upload_tree(sources.demo_dir(), f"{B}/data")
  workdir = f"{B}/runs/two"
  common = ["--config.checkpoint.every=2", "--config.optim.decay_steps=6",
            "--config.metrics.log_every=1"]  # one schedule for the 4-step run and its resumption
  bucket_data = [f"--config.data.sources={B}/data",
                 f"--config.data.tokenizer={B}/data/tokenizer.model"]
  cache = tmp_path / "cache"
  for steps in (4, 6):
    run = subprocess.run(
        [sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=4",
         f"--log_dir={tmp_path / str(steps)}", "--",
         f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
         f"--config.train.steps={steps}", *common, *bucket_data,
         "--config.data.prefetch=0", "--config.optim.warmup_steps=1"],
        env={**env(4), "JAX_PLATFORMS": "cpu", "MAXGEMMA_CACHE": str(cache)}, cwd=ROOT,
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
  for p in (0, 1):  # both processes restored the step-4 checkpoint from the bucket
    log = (tmp_path / "6" / f"process_{p}.log").read_text()
    assert f"resumed from {workdir}/checkpoints/4 at step 4" in log
  assert os.listdir(cache / "remote" / "gs" / gcs_utils.BUCKET / "data")  # fetched, cached
  ckpts = storage.path(f"{workdir}/checkpoints")
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4, 6]
  assert sorted(p.name for p in (ckpts / "6" / "data").glob("shard_*.json")) == [
      f"shard_{j:05d}-of-00008.json" for j in range(8)]
  lines = storage.path(f"{workdir}/metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]  # process 0 writes, once
  assert json.loads(storage.path(f"{workdir}/last_metrics.json").read_text())["step"] == 6
  assert storage.path(f"{workdir}/config.json").is_file()

  local = str(tmp_path / "local")
  ref = run_train(local, *common, "--config.train.steps=6")
  assert ref.returncode == 0, ref.stderr[-3000:]
  remote = {}
  for line in lines:
    record = json.loads(line)
    if "loss" in record:
      remote.setdefault(record["step"], []).append(record["loss"])
  expected = losses_by_step(local)
  assert sorted(remote) == sorted(expected) == list(range(1, 7))
  np.testing.assert_allclose([remote[s][-1] for s in range(1, 7)],
                             [expected[s][-1] for s in range(1, 7)], rtol=1e-5)

  out = tmp_path / "hf"
  export = subprocess.run([sys.executable, "-m", "maxgemma.export", f"--workdir={workdir}",
                           "--format=hf", f"--out={out}"], env=env(1), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert export.returncode == 0, export.stderr[-3000:]
  assert (out / "model.safetensors").is_file() or list(out.glob("*.safetensors"))
  assert (out / "tokenizer.model").read_bytes() == \
      open(os.path.join(sources.demo_dir(), "tokenizer.model"), "rb").read()
  sample = subprocess.run([sys.executable, "-m", "maxgemma.sample", f"--workdir={workdir}",
                           "--prompt=Once upon a time", "--max_new_tokens=4"], env=env(1),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert sample.returncode == 0, sample.stderr[-3000:]
  assert "Once upon a time" in sample.stdout


def test_a_host_fetches_only_the_shard_files_its_loader_shards_read(gcs, tmp_path):
  """9 shard files, 3 loader shards: loader shard 1 reads files 1, 4, 7 and fetches no other."""
  from maxgemma.config import base_config  # noqa: PLC0415
  from maxgemma.data import pipeline, prepare  # noqa: PLC0415

  corpus = os.path.join(sources.demo_dir(), "corpus.jsonl")
  assert prepare.main(["--input", corpus, f"--output={tmp_path / 'multi'}", "--unit_mb=0.1",
                       "--workers=1", "--quiet"]) == 0
  files = sorted(f for f in os.listdir(tmp_path / "multi") if f.endswith(".array_record"))
  assert len(files) == 9
  storage.upload_tree(str(tmp_path / "multi"), f"{B}/multi")
  cfg = base_config().data
  cfg.sources, cfg.cache_dir, cfg.loader_shards = f"{B}/multi", str(tmp_path / "cache"), 3
  it = pipeline.make_train_iterator(cfg, seq_len=64, global_batch=6, seed=0, shards=[1])
  for _ in range(40):  # its first read group of 64 documents already spans its 3 files
    next(it)
  it.close()
  fetched = sorted(f for _, _, fs in os.walk(tmp_path / "cache") for f in fs)
  assert fetched == [files[1], files[4], files[7]]


def test_prepare_into_a_bucket(gcs, tmp_path, monkeypatch):
  """Prepared locally, uploaded with the manifest last; the same shards as a local prepare."""
  from maxgemma.data import prepare  # noqa: PLC0415

  monkeypatch.setenv("MAXGEMMA_CACHE", str(tmp_path / "cache"))
  corpus = os.path.join(sources.demo_dir(), "corpus.jsonl")
  args = ["--input", corpus, "--eval_fraction=0.1", "--workers=1", "--quiet"]
  assert prepare.main([*args, f"--output={B}/prepared"]) == 0
  assert prepare.main([*args, f"--output={tmp_path / 'local'}"]) == 0
  remote = sources.resolve(f"{B}/prepared", 1.0, "train", setting="s", cache=str(tmp_path / "c"))
  local = sources.resolve(str(tmp_path / "local"), 1.0, "train", setting="s")
  assert remote.documents == local.documents > 0
  for f, x in enumerate(local.paths):
    assert open(remote.local_path(f), "rb").read() == open(x, "rb").read()
  assert prepare.main([*args, f"--output={B}/prepared"]) == 0  # finished: nothing redone
  monkeypatch.setenv("MAXGEMMA_CACHE", str(tmp_path / "other-machine"))
  assert prepare.main([*args, f"--output={B}/prepared"]) == 2  # would replace another's dataset
