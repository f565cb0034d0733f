"""Every mesh layout across real processes (launch.local, gloo) equals one process, on the real
grain pipeline over the packaged corpus; a run resumes on other process counts with the exact
stream. Float32 (configs/tiny.py), losses compared with rtol 1e-5.

One straight 12-step run on one process is the reference of every test (the learning-rate
horizon is fixed by `optim.decay_steps`, so a shorter run's steps are its first steps).
Data-parallel across processes is the 4-process resume.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.train_utils import ROOT, losses_by_step, run_train, train_command

STEPS = 4  # steps of each layout run
TOTAL = 12  # steps of the reference and of the resumed runs
COMMON = ("--config.optim.decay_steps=12", "--config.checkpoint.every=100",
          "--config.metrics.tensorboard=False")


def launch(workdir, log_dir, processes: int, devices: int, *overrides: str
           ) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if not k.startswith("MAXGEMMA_")}
  env["PYTHONPATH"] = ROOT
  args = train_command(str(workdir), *COMMON, *overrides)[3:]  # after `python -m maxgemma.train`
  res = subprocess.run(
      [sys.executable, "-m", "launch.local", f"--processes={processes}",
       f"--devices_per_process={devices}", f"--log_dir={log_dir}", "--timeout=500", "--", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return res


def losses(workdir) -> list[float]:
  by_step = losses_by_step(str(workdir))
  return [by_step[s][-1] for s in sorted(by_step)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The reference: 1 process, 8 devices, data-parallel, TOTAL steps."""
  workdir = tmp_path_factory.mktemp("single") / "run"
  res = run_train(str(workdir), *COMMON, f"--config.train.steps={TOTAL}", devices=8)
  assert res.returncode == 0, res.stderr[-3000:]
  got = losses(workdir)
  assert len(got) == TOTAL
  return got


LAYOUTS = {
    "2x4 tensor 8": (2, 4, ["--config.mesh.ici_data=1", "--config.mesh.ici_tensor=8"]),
    "4x2 fsdp 2 x tensor 4": (4, 2, ["--config.mesh.ici_data=1", "--config.mesh.ici_fsdp=2",
                                     "--config.mesh.ici_tensor=4"]),
    "2x4 fsdp 2 x tensor 2, dcn_data 2": (2, 4, [
        "--config.mesh.ici_data=1", "--config.mesh.ici_fsdp=2", "--config.mesh.ici_tensor=2",
        "--config.mesh.dcn_data=2"]),
    # Each row's 64 positions split over processes: the data feed gives each host its slices.
    "2x4 sequence 4 x tensor 2": (2, 4, ["--config.mesh.ici_data=1", "--config.mesh.ici_sequence=4",
                                         "--config.mesh.ici_tensor=2"]),
    # fsdp and sequence both span processes; the ring passes keys and values between them and
    # the state is split over fsdp x sequence.
    "4x2 fsdp 2 x sequence 2 x tensor 2, ring, state over sequence": (4, 2, [
        "--config.mesh.ici_data=1", "--config.mesh.ici_fsdp=2", "--config.mesh.ici_sequence=2",
        "--config.mesh.ici_tensor=2", "--config.model.attention_impl=ring",
        "--config.mesh.shard_state_over_sequence=true"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_across_processes_equals_one_process(layout, one_process, tmp_path):
  processes, devices, mesh = LAYOUTS[layout]
  res = launch(tmp_path / "run", tmp_path / "logs", processes, devices,
               f"--config.train.steps={STEPS}", *mesh)
  assert f"all {processes} processes finished OK" in res.stdout
  got = losses(tmp_path / "run")
  assert len(got) == STEPS
  np.testing.assert_allclose(got, one_process[:STEPS], rtol=1e-5)
  # Hosts sharing rows (a tensor group spanning them) are planned.
  log0 = (tmp_path / "logs" / "process_0.log").read_text()
  assert "data feed: " in log0 and "hosts loading each row: " in log0


@pytest.mark.slow
def test_resume_on_one_and_on_four_processes_continues_the_exact_stream(one_process, tmp_path):
  """2 processes to step 6, then 1 process and 4 processes to step 12 == a straight 12 steps."""
  first = tmp_path / "first"
  launch(first, tmp_path / "l2", 2, 2, "--config.train.steps=6")
  # Every loader shard's position is in the checkpoint (one per row of the batch of 8), each
  # written by the one process that owns it.
  data = first / "checkpoints" / "6" / "data"
  assert sorted(f.name for f in data.iterdir() if f.name.startswith("shard_")) == [
      f"shard_{j:05d}-of-00008.json" for j in range(8)]
  on_one, on_four = tmp_path / "one", tmp_path / "four"
  shutil.copytree(first, on_one)
  shutil.copytree(first, on_four)
  res = run_train(str(on_one), *COMMON, f"--config.train.steps={TOTAL}", devices=4)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resumed from" in res.stderr and "starts again" not in res.stderr
  launch(on_four, tmp_path / "l4", 4, 1, f"--config.train.steps={TOTAL}")
  for workdir in (on_one, on_four):
    by_step = losses_by_step(str(workdir))
    assert sorted(by_step) == list(range(1, TOTAL + 1))
    assert all(len(v) == 1 for v in by_step.values())  # no step trained twice
    np.testing.assert_allclose(losses(workdir), one_process, rtol=1e-5)


def test_a_resume_with_other_data_settings_is_refused_and_nothing_is_touched(tmp_path):
  workdir = tmp_path / "run"
  res = run_train(str(workdir), *COMMON, "--config.train.steps=2", devices=2)
  assert res.returncode == 0, res.stderr[-3000:]
  ckpts = workdir / "checkpoints"
  before = sorted(str(p.relative_to(ckpts)) for p in ckpts.rglob("*"))
  # One line names every setting that differs; another loader-shard count has no saved shards.
  for overrides, keys in ((("--config.train.seq_len=32", "--config.data.packing=False"),
                           ("config.train.seq_len", "config.data.packing")),
                          (("--config.data.loader_shards=4",), ("config.data.loader_shards",))):
    res = run_train(str(workdir), *COMMON, "--config.train.steps=4", *overrides, devices=2)
    assert res.returncode != 0
    lines = [x for x in res.stderr.splitlines() if "maxgemma.train: error:" in x]
    assert len(lines) == 1 and all(k in lines[0] for k in keys), res.stderr[-2000:]
    assert sorted(str(p.relative_to(ckpts)) for p in ckpts.rglob("*")) == before


def test_host_block_lays_each_process_as_a_block_of_the_fsdp_tensor_grid():
  """mesh.host_block=2x2 on 4 processes x 4 devices, fsdp 4 x tensor 4: the v5e-16 host map."""
  from types import SimpleNamespace

  from maxgemma import sharding
  from maxgemma.config import base_config

  devices = [SimpleNamespace(process_index=p, id=4 * p + i, platform="cpu", slice_index=0)
             for p in range(4) for i in range(4)]
  cfg = base_config().mesh
  cfg.ici_data, cfg.ici_fsdp, cfg.ici_tensor = 1, 4, 4
  ici, _ = sharding.resolve_axes(cfg, 16)
  cfg.host_block = "2x2"
  grid = sharding._lay_hosts(devices, ici, sharding._host_block(cfg, ici, devices))
  assert grid.shape == (1, 4, 1, 4)  # data, fsdp, sequence, tensor
  hosts = np.vectorize(lambda d: d.process_index)(grid)[0, :, 0]  # the fsdp x tensor grid
  assert hosts.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
  plain = sharding._lay_hosts(devices, ici, None)[0, :, 0]
  assert np.vectorize(lambda d: d.process_index)(plain).tolist() == [[p] * 4 for p in range(4)]
  cfg.host_block = "4x2"
  with pytest.raises(ValueError, match=r"mesh.host_block=4x2: a 4x2 block must hold one "
                                       r"process's 4 devices"):
    sharding._host_block(cfg, ici, devices)
