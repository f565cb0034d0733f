"""A stand-in trainer for `launch.local` tests: joins the job, sums a global array across processes.

Run by `python -m launch.local --module=tests.multiproc_probe -- [--fail_process=K ...]`. Each
process fills its shards of a global [P*D] array with (global index + 1); a jitted sum and a
shard_map psum must both equal n(n+1)/2. Prints `PROBE ok ...` (exit 0) or `PROBE mismatch ...`
(exit 1).

Failure modes for the launcher's tests:
  --fail_process=K --fail_code=N: process K exits with code N right after joining the job, so the
    others block in the collective until the launcher stops them;
  --sleep=S: skip jax, print `PROBE sleeping pid=...` and sleep S seconds (for signal tests);
    with --sigterm_codes=C0,C1,...: process i exits with code Ci on SIGTERM instead of dying of it
    (Ci = ignore: it ignores SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--fail_process", type=int, default=-1)
  parser.add_argument("--fail_code", type=int, default=3)
  parser.add_argument("--sleep", type=float, default=0.0)
  parser.add_argument("--echo", action="append", default=[])
  parser.add_argument("--sigterm_codes", default="")
  args = parser.parse_args(argv)
  for text in args.echo:  # arguments arrive intact through the launcher
    print(f"PROBE echo {text!r}", flush=True)

  if args.sleep:
    if args.sigterm_codes:
      code = args.sigterm_codes.split(",")[int(os.environ["MAXGEMMA_PROCESS_ID"])]
      signal.signal(signal.SIGTERM, signal.SIG_IGN if code == "ignore"
                    else lambda *_: os._exit(int(code)))
    print(f"PROBE sleeping pid={os.getpid()} process={os.environ.get('MAXGEMMA_PROCESS_ID')}",
          flush=True)
    time.sleep(args.sleep)
    return 0

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from maxgemma import distributed

  distributed.initialize()
  distributed.initialize()  # idempotent: a second call must be a no-op
  print(f"PROBE {distributed.process_summary()}", flush=True)
  if jax.process_index() == args.fail_process:
    print(f"PROBE process {args.fail_process} exiting with code {args.fail_code}", flush=True)
    os._exit(args.fail_code)

  n = jax.device_count()
  mesh = Mesh(np.array(jax.devices()), ("x",))
  sharding = NamedSharding(mesh, P("x"))
  x = jax.make_array_from_callback(
      (n,), sharding, lambda idx: np.arange(n, dtype=np.float32)[idx] + 1.0)
  total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))
  psum = jax.jit(jax.shard_map(lambda s: jax.lax.psum(jnp.sum(s), "x"), mesh=mesh,
                               in_specs=P("x"), out_specs=P()))(x)
  psum = float(psum.addressable_data(0))
  expected = n * (n + 1) / 2
  ok = total == expected and psum == expected
  print(f"PROBE {'ok' if ok else 'mismatch'} process={jax.process_index()} "
        f"processes={jax.process_count()} devices={n} sum={total:g} psum={psum:g} "
        f"expected={expected:g}", flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
