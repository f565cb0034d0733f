"""maxgemma.distributed: where the settings come from and the errors for inconsistent ones.

The real multi-process join is exercised in tests/test_launch_local.py (separate processes:
jax.distributed cannot be initialized twice in one test process).
"""

from __future__ import annotations

import ml_collections
import pytest

from maxgemma import distributed
from maxgemma.config import base_config

ENV = {"MAXGEMMA_COORDINATOR": "127.0.0.1:5000", "MAXGEMMA_NUM_PROCESSES": "4",
       "MAXGEMMA_PROCESS_ID": "3"}


def section(**kw) -> ml_collections.ConfigDict:
  c = base_config().distributed
  c.update(kw)
  return c


def test_nothing_set_is_a_single_process():
  assert distributed.resolve(section(), {}).mode == "single"
  assert distributed.resolve(None, {}).mode == "single"


def test_environment_gives_an_explicit_job():
  p = distributed.resolve(section(), ENV)
  assert (p.mode, p.coordinator, p.num_processes, p.process_id) == ("explicit", "127.0.0.1:5000",
                                                                    4, 3)


def test_config_wins_over_environment_per_key():
  p = distributed.resolve(section(process_id=1, coordinator="10.0.0.2:8476"), ENV)
  assert (p.coordinator, p.num_processes, p.process_id) == ("10.0.0.2:8476", 4, 1)
  whole = base_config()
  whole.distributed.num_processes = 2
  whole.distributed.process_id = 0
  assert distributed.resolve(whole, ENV).num_processes == 2  # the whole config works too


def test_auto_and_tpu_detection():
  assert distributed.resolve(None, {"MAXGEMMA_COORDINATOR": "auto"}).mode == "auto"
  assert distributed.resolve(None, {"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}).mode == "auto"
  assert distributed.resolve(None, {"MEGASCALE_NUM_SLICES": "16"}).mode == "auto"
  assert distributed.resolve(None, {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}).mode == "auto"
  assert distributed.resolve(None, {"TPU_WORKER_HOSTNAMES": "localhost"}).mode == "single"
  assert distributed.resolve(None, {"MEGASCALE_NUM_SLICES": "1"}).mode == "single"
  # An explicit coordinator beats the TPU environment.
  assert distributed.resolve(None, {**ENV, "MEGASCALE_NUM_SLICES": "2"}).mode == "explicit"


def test_one_process_without_coordinator_is_fine():
  assert distributed.resolve(None, {"MAXGEMMA_NUM_PROCESSES": "1"}).mode == "single"
  assert distributed.resolve(section(process_id=0), {}).mode == "single"


@pytest.mark.parametrize("cfg,env,message", [
    (None, {**ENV, "MAXGEMMA_PROCESS_ID": "4"},
     "MAXGEMMA_PROCESS_ID=4 is out of range for 4 processes: use 0..3"),
    (section(process_id=-2), ENV,
     "config.distributed.process_id=-2 is out of range for 4 processes: use 0..3"),
    (None, {"MAXGEMMA_COORDINATOR": "127.0.0.1:5000", "MAXGEMMA_PROCESS_ID": "0"},
     "the number of processes is missing: set config.distributed.num_processes or "
     "MAXGEMMA_NUM_PROCESSES"),
    (None, {"MAXGEMMA_COORDINATOR": "127.0.0.1:5000", "MAXGEMMA_NUM_PROCESSES": "2"},
     "this process's id is missing: set config.distributed.process_id or MAXGEMMA_PROCESS_ID "
     "(0..1)"),
    (None, {**ENV, "MAXGEMMA_NUM_PROCESSES": "four"},
     "MAXGEMMA_NUM_PROCESSES='four' is not an integer"),
    (None, {**ENV, "MAXGEMMA_NUM_PROCESSES": "0"}, "MAXGEMMA_NUM_PROCESSES=0 must be at least 1"),
    (None, {**ENV, "MAXGEMMA_COORDINATOR": "127.0.0.1"}, "is not host:port"),
    (section(coordinator="host:99999"), {}, "config.distributed.coordinator='host:99999' is not "
     "host:port"),
    (None, {"MAXGEMMA_NUM_PROCESSES": "2", "MAXGEMMA_PROCESS_ID": "1"},
     "MAXGEMMA_NUM_PROCESSES=2, MAXGEMMA_PROCESS_ID=1 is set but no coordinator"),
    (None, {"MAXGEMMA_COORDINATOR": "auto", "MAXGEMMA_NUM_PROCESSES": "2"},
     "MAXGEMMA_COORDINATOR=auto detects the processes itself, but MAXGEMMA_NUM_PROCESSES is also "
     "set"),
    ({"coordinator": "", "num_procs": 2}, {}, "unknown key(s) in config.distributed: num_procs"),
])
def test_inconsistent_settings_get_one_line_errors(cfg, env, message):
  with pytest.raises(ValueError) as e:
    distributed.resolve(cfg, env)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_initialize_single_process_is_a_no_op(monkeypatch):
  for name in ("MAXGEMMA_COORDINATOR", "MAXGEMMA_NUM_PROCESSES", "MAXGEMMA_PROCESS_ID",
               "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
               "MEGASCALE_NUM_SLICES"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_state", {})
  distributed.initialize(base_config())
  distributed.initialize(base_config())  # idempotent
  import jax

  assert not jax.distributed.is_initialized()
  assert distributed.plan().mode == "single"
  summary = distributed.process_summary()
  assert summary.startswith(f"process 0 of 1: {jax.local_device_count()} local / "
                            f"{jax.device_count()} global cpu devices")


def test_initialize_raises_before_touching_jax(monkeypatch):
  monkeypatch.setattr(distributed, "_state", {})
  monkeypatch.setenv("MAXGEMMA_COORDINATOR", "127.0.0.1:5000")
  monkeypatch.delenv("MAXGEMMA_NUM_PROCESSES", raising=False)
  with pytest.raises(ValueError, match="number of processes is missing"):
    distributed.initialize()
  assert distributed.plan() is None
