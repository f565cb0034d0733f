"""Test set-up: 8 fake CPU devices and fast CPU compiles for every test process (set before jax is
imported; tests/xla_env.py)."""

import os

from tests.xla_env import cpu_flags

os.environ.setdefault("XLA_FLAGS", cpu_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
