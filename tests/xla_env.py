"""The XLA flags of every test process: fake CPU devices, and LLVM at -O0.

Tests compile many small programs and run each for a few steps, so compiling dominates their CPU
time; `--xla_backend_optimization_level=0` skips LLVM's optimisation of the generated CPU code,
which leaves the HLO passes (fusion, SPMD partitioning, scheduling) and the arithmetic as they are.
The doc sessions use it too (tests/test_docs.py), except the docs in `OPTIMISED_DOCS` and the
demo, whose longer runs gain more from optimised code than they spend compiling it
(docs/performance.md).
No jax import here: conftest.py uses this before jax starts.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
