"""The data-feed planner on the real device-to-host maps of TPU pods (libtpu topology
descriptions, no TPU needed): every global row is loaded by exactly the hosts whose devices hold
it, and no host loads a row it does not hold. The expected rows come from the mesh coordinates
(data-parallel index = data x FSDP + fsdp), not from the planner's own sharding query."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from configs import (
  gemma3_1b_v5e_512,
  gemma3_4b_v5e_2048,
  gemma_2b_v5e_2pods,
  gemma_7b_v5e,
  gemma_7b_v5e_1pod,
  gemma_7b_v5e_16pods,
)
from maxgemma import feed, sharding
from maxgemma.data import pipeline

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed: pip install 'jax[tpu]' "
                                       "(`make test` installs it)")


def topology(name: str, slices: int):
  from jax.experimental import topologies
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return list(topologies.get_topology_desc(
      platform="tpu", topology_name=name, chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), num_slices=slices).devices)


def expected_rows(mesh, global_batch: int) -> dict[int, set[int]]:
  """Host -> rows, from each device's (data, fsdp) coordinates in the mesh."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  per = global_batch // dp
  out: dict[int, set[int]] = {}
  for (d, f, _s, _t), device in np.ndenumerate(mesh.devices):
    block = d * mesh.shape["fsdp"] + f
    out.setdefault(device.process_index, set()).update(range(block * per, (block + 1) * per))
  return out


@pytest.mark.parametrize("module,slices", [(gemma_7b_v5e_1pod, 1), (gemma_2b_v5e_2pods, 2),
                                           (gemma_7b_v5e_16pods, 2), (gemma3_1b_v5e_512, 2),
                                           (gemma3_4b_v5e_2048, 2), (gemma_7b_v5e, 1)])
def test_pod_feed_plan_loads_exactly_the_rows_each_host_holds(module, slices):
  cfg = module.get_config()
  devices = topology("v5e:16x16", slices)
  if slices > 1 and cfg.mesh.dcn_data != slices:  # the 16- and 8-pod configs, on 2 of the pods
    cfg.train.global_batch = cfg.train.global_batch // cfg.mesh.dcn_data * slices
    cfg.mesh.dcn_data = slices
  mesh = sharding.make_mesh(cfg.mesh, devices)
  B = cfg.train.global_batch
  plan = feed.plan(mesh, B, pipeline.loader_shard_count(cfg.data, B))
  want = expected_rows(mesh, B)
  assert len(plan.rows) == 64 * slices  # 4 chips per host
  assert {p: set(r) for p, r in plan.rows.items()} == want
  per = plan.rows_per_shard
  for p, shards in plan.shards.items():  # its loader shards give exactly its rows
    assert sorted(r for j in shards for r in range(j * per, (j + 1) * per)) == sorted(want[p])
  holders = {r: {p for p, rows in want.items() if r in rows} for r in range(B)}
  assert plan.hosts_per_row() == {r: len(h) for r, h in holders.items()}
  assert sorted(plan.owner) == list(range(plan.loader_shards))
  assert all(plan.owner[j] == min(p for p, s in plan.shards.items() if j in s)
             for j in plan.owner)
  if mesh.shape["tensor"] * mesh.shape["sequence"] > 2:  # such a group spans hosts (a pair
    # fits in a host's 2 x 2 chips): they share rows (a `sequence` group feeds whole rows; the
    # model slices them along the length)
    assert min(plan.hosts_per_row().values()) > 1


def test_a_layout_the_loader_shards_cannot_feed_is_refused():
  cfg = gemma_7b_v5e_1pod.get_config()
  mesh = sharding.make_mesh(cfg.mesh, topology("v5e:16x16", 1))
  B = cfg.train.global_batch
  with pytest.raises(ValueError, match=r"config.data.loader_shards=1: loader shard 0 .* is split "
                                       r"between processes.*use a multiple of"):
    feed.plan(mesh, B, 1)
  with pytest.raises(ValueError, match=r"train.global_batch \(100\) must be divisible by the "
                                       r"data-parallel size 16 \(data x fsdp = 1 x 16.*ici_fsdp"):
    feed.plan(mesh, 100, 100)


def test_the_aot_compile_plans_the_feed_and_refuses_a_layout_it_cannot_feed():
  from maxgemma import aot
  from maxgemma.config import base_config

  cfg = base_config()
  cfg.model.preset = "tiny_gemma1_mha"
  cfg.train.global_batch, cfg.train.seq_len = 8, 64
  cfg.mesh.ici_data, cfg.mesh.ici_fsdp, cfg.mesh.ici_tensor = 1, 4, 4
  report = aot.compile_train_step(cfg, "v5e:4x4", 1)  # 16 chips, 4 hosts of 2 x 2
  assert report["feed"]["hosts"] == 4
  # The rows per host from the mesh coordinates, not from the planner.
  mesh = sharding.make_mesh(cfg.mesh, topology("v5e:4x4", 1))
  rows = expected_rows(mesh, 8)
  assert report["feed"]["rows_per_host"] == sorted({len(r) for r in rows.values()})
  assert "data feed: 4 hosts" in aot.format_report(report)
  cfg.data.loader_shards = 1
  with pytest.raises(ValueError, match="config.data.loader_shards=1: loader shard 0"):
    aot.compile_train_step(cfg, "v5e:4x4", 1)
