"""The trainer end to end: resume, preemption, cross-mesh restore, metrics, bad input."""

import os
import random
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from maxgemma import checkpoint
from maxgemma.trainer.loop import train
from tests.train_utils import (
  PEAK,
  ROOT,
  env,
  logged,
  losses_by_step,
  run_train,
  tiny_config,
  train_command,
)


def _hand_counted_flops_per_token(params, model_cfg, L: int) -> float:
  """Training FLOPs per token, not from maxgemma.model.flops: 6 per matmul weight of the saved
  tree (all but the norm scales; the tied embedding is the logits matmul) plus 12 * heads *
  head_dim per (query, key) pair each layer's causal, windowed mask allows, counted by brute
  force."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  weights = sum(x.size for path, x in leaves if "norm" not in jax.tree_util.keystr(path))
  i = np.arange(L)
  windows = [model_cfg.sliding_window if t == "local" else L + 1 for t in model_cfg.layer_types()]
  pairs = sum(((i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < w)).sum() for w in windows)
  return 6 * weights + 12 * model_cfg.num_heads * model_cfg.head_dim * pairs / L


def test_trains_checkpoints_and_logs_consistent_metrics(tmp_path):
  cfg = tiny_config(**{"train.steps": 6, "checkpoint.every": 3, "train.eval_every": 3,
                       "train.profile_steps": "2:4"})
  last = train(cfg, str(tmp_path))
  assert last["step"] == 6
  evals = [r for r in logged(str(tmp_path)) if "eval_loss" in r]
  assert [r["step"] for r in evals] == [3, 6] and all(4 < r["eval_loss"] < 9 for r in evals)
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces
  assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [3, 6]
  records = [r for r in logged(str(tmp_path)) if "loss" in r]
  assert [r["step"] for r in records] == list(range(1, 7))
  params, model_cfg, _ = checkpoint.load_params(str(tmp_path))
  tokens = cfg.train.global_batch * cfg.train.seq_len
  flops_per_step = _hand_counted_flops_per_token(params, model_cfg, cfg.train.seq_len) * tokens
  for r in records:
    assert r["tokens_per_sec"] == pytest.approx(tokens / r["step_time"], rel=1e-9)
    assert r["mfu"] == pytest.approx(flops_per_step / (r["step_time"] * 8 * PEAK), rel=1e-9)
  assert os.listdir(tmp_path / "tensorboard")


def _kill_when(proc, workdir, condition, timeout=240):
  start = time.time()
  while time.time() - start < timeout:
    if proc.poll() is not None:
      return False
    if condition(workdir):
      proc.kill()
      proc.wait()
      return True
    time.sleep(0.005)
  raise TimeoutError("the training process made no progress")


def _saving(workdir, before=None):
  ckpts = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpts) and any("tmp" in d for d in os.listdir(ckpts))


@pytest.mark.slow
def test_kill_minus_9_then_resume_is_bit_identical(tmp_path):
  args = ["--config.train.steps=10", "--config.checkpoint.every=2"]
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  assert run_train(ref, *args).returncode == 0
  rng = random.Random(0)
  kills = [("during a save", _saving)]
  for n in rng.sample(range(2, 5), 1):  # during a step: once this run has logged n steps
    kills.append((f"after {n} more logged steps",
                  lambda w, n=n, before=None: len(logged(w)) >= before + n))
  killed = []
  for name, condition in kills:
    proc = subprocess.Popen(train_command(run, *args), env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before = len(logged(run))
    if _kill_when(proc, run, lambda w, c=condition, b=before: c(w, before=b)):
      killed.append(name)
  assert killed, "no kill landed"
  final = run_train(run, *args)
  assert final.returncode == 0, final.stderr[-2000:]

  ref_losses, run_losses = losses_by_step(ref), losses_by_step(run)
  assert set(run_losses) == set(ref_losses)
  for step_no, values in run_losses.items():
    assert all(v == ref_losses[step_no][0] for v in values), (step_no, values, killed)
  ref_params, _, ref_step = checkpoint.load_params(ref)
  params, _, step = checkpoint.load_params(run)
  assert step == ref_step == 10
  for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)  # bit-identical
  print("killed:", killed)


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path):
  workdir = str(tmp_path)
  proc = subprocess.Popen(train_command(workdir, "--config.train.steps=1000",
                                        "--config.checkpoint.every=1000"),
                          env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while len(logged(workdir)) < 3 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  saved = checkpoint.Checkpointer(workdir).latest_step()
  assert saved is not None and saved >= 3
  assert saved == max(r["step"] for r in logged(workdir))  # the step it was on, nothing lost


@pytest.mark.slow
def test_checkpoint_restores_onto_other_meshes_and_continues(tmp_path):
  # The schedule's horizon is fixed, so the 4-step run is the start of the 6-step one.
  common = {"train.steps": 6, "checkpoint.every": 4, "optim.decay_steps": 6}
  # Uninterrupted reference on data 8; its step-4 checkpoint is what the others resume.
  train(tiny_config(**common, **{"mesh.ici_data": 8}), str(tmp_path / "ref"))
  reference = losses_by_step(str(tmp_path / "ref"))
  assert checkpoint.Checkpointer(str(tmp_path / "ref")).all_steps() == [4, 6]
  for name, overrides, devices in [
      ("data2_tensor4", ["--config.mesh.ici_data=2", "--config.mesh.ici_tensor=4"], 8),
      ("one_device", ["--config.mesh.ici_data=1"], 1)]:
    workdir = tmp_path / name
    shutil.copytree(tmp_path / "ref", workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")  # resumes from step 4
    result = run_train(str(workdir), "--config.train.steps=6", "--config.checkpoint.every=4",
                       "--config.optim.decay_steps=6", *overrides, devices=devices)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = losses_by_step(str(workdir))
    for step_no in (5, 6):
      np.testing.assert_allclose(resumed[step_no][-1], reference[step_no][0], rtol=1e-5,
                                 err_msg=name)


def test_unknown_config_key_names_the_nearest(tmp_path):
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.train.stpes = 3
  with pytest.raises(ValueError,
                     match="unknown config key 'train.stpes'; did you mean train.steps"):
    train(cfg, str(tmp_path))


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
  with pytest.raises(ValueError, match=r"train.global_batch \(6\) must be divisible by the "
                                       r"data-parallel size 8 \(data x fsdp = 8 x 1, each ICI x "
                                       r"DCN: mesh.ici_data, .*\).* try train.global_batch=8"):
    train(tiny_config(**{"train.global_batch": 6}), str(tmp_path))


def test_workdir_of_another_model_is_refused_and_kept(tmp_path):
  train(tiny_config(**{"train.steps": 2, "checkpoint.every": 2}), str(tmp_path))
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  with pytest.raises(ValueError, match="holds checkpoints of a different model.*num_layers"):
    train(tiny_config(**{"train.steps": 4, "model.num_layers": 2}), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_corrupt_checkpoint_gets_a_clear_error_and_is_kept(tmp_path):
  train(tiny_config(**{"train.steps": 4, "checkpoint.every": 2}), str(tmp_path))
  params_dir = tmp_path / "checkpoints" / "4" / "params"
  for root, _, files in os.walk(params_dir):
    for f in files:
      if "manifest" in f or f.endswith(".ocdbt") or "d" == os.path.basename(root):
        os.remove(os.path.join(root, f))
  with pytest.raises(checkpoint.CorruptCheckpointError,
                     match=r"checkpoints/4 cannot be restored .*earlier step \(\[2\]\)"):
    train(tiny_config(**{"train.steps": 6}), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_nan_stops_without_a_checkpoint(tmp_path):
  """A non-finite step stops the run, and no checkpoint of that step (or later) is written:
  with a save every step, the checkpoints are exactly the steps before it, their weights finite."""
  cfg = tiny_config(**{"train.steps": 4, "checkpoint.every": 1, "optim.learning_rate": 1e30,
                       "optim.warmup_steps": 0, "optim.clip_norm": 0.0})
  with pytest.raises(RuntimeError, match=r"step \d+: non-finite .*no checkpoint written") as err:
    train(cfg, str(tmp_path))
  bad = int(re.search(r"step (\d+): non-finite", str(err.value)).group(1))
  assert 1 <= bad <= 4
  saved = checkpoint.Checkpointer(str(tmp_path)).all_steps()
  assert saved == list(range(1, bad)), (bad, saved)
  if saved:
    params = checkpoint.load_params(str(tmp_path))[0]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.fixture
def small_disk(tmp_path):
  """An 8 MB tmpfs: room for one tiny-model checkpoint, not two (needs root, as CI has)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                    capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here (not root)")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(small_disk):
  workdir = str(small_disk / "run")
  result = run_train(workdir, "--config.train.steps=8", "--config.checkpoint.every=2")
  assert result.returncode != 0
  message = [line for line in result.stderr.splitlines() if "maxgemma.train: error" in line]
  assert message and "No space left on device" in message[0]
  assert "newest complete checkpoint (step 2) is intact" in message[0]
  assert checkpoint.Checkpointer(workdir).latest_step() == 2
  # Room again: the run resumes from step 2 and finishes.
  subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
  result = run_train(workdir, "--config.train.steps=8", "--config.checkpoint.every=2")
  assert result.returncode == 0, result.stderr[-2000:]
  assert checkpoint.Checkpointer(workdir).latest_step() == 8


def test_keeps_the_last_n_plus_every_kth(tmp_path):
  cfg = tiny_config(**{"train.steps": 9, "checkpoint.every": 1, "checkpoint.keep_last": 2,
                       "checkpoint.keep_every": 4})
  train(cfg, str(tmp_path))
  assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [4, 8, 9]


def test_nan_skip_policy_finishes_with_finite_weights(tmp_path, caplog):
  # A huge learning rate makes later steps overflow; each such step is skipped, not applied.
  cfg = tiny_config(**{"train.steps": 5, "checkpoint.every": 5, "optim.learning_rate": 1e30,
                       "optim.clip_norm": 0.0, "train.nan_policy": "skip"})
  train(cfg, str(tmp_path))
  assert "skipping the batch" in caplog.text
  params, _, step = checkpoint.load_params(str(tmp_path))
  assert step == 5
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_persistent_cache_is_turned_off_for_steps_on_several_cpu_devices(tmp_path):
  """A run on several CPU devices turns a configured persistent compilation cache off (XLA:CPU
  steps loaded from it can deadlock in collectives); one device, or no cache, is left alone."""
  from jax.sharding import Mesh

  from maxgemma.trainer import loop
  saved = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  eight = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
  one = Mesh(np.array(jax.devices()[:1]).reshape(1), ("data",))
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert not loop._persistent_cache_off_for_cpu_collectives(eight)  # no cache configured
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_enable_compilation_cache", True)
    assert not loop._persistent_cache_off_for_cpu_collectives(one)
    assert jax.config.jax_enable_compilation_cache
    assert loop._persistent_cache_off_for_cpu_collectives(eight)
    assert not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_enable_compilation_cache", saved[0])
    jax.config.update("jax_compilation_cache_dir", saved[1])
