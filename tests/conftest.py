"""Test set-up: 8 fake CPU devices for every test process (set before jax is imported), and one
persistent XLA compilation cache per test session for the processes the tests start.

Trainers, samplers and exports run as subprocesses compile the same small programs again and
again (the tiny model's step, orbax's per-array slices at a checkpoint): with the cache each is
compiled once per session. The directory is made by the first test process (pytest, or the xdist
controller, whose workers inherit it) and removed when it exits. The test processes themselves
keep the cache off, so in-process tests always compile afresh; `maxgemma.aot` turns it off for
its own compile as well.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="maxgemma-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update({
      "JAX_COMPILATION_CACHE_DIR": _cache,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      # A size limit turns on jax's file lock around every cache read and write, so concurrent
      # processes never read a half-written entry.
      "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30),
  })

import jax  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)
