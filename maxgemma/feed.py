"""The data feed: which loader shards each process runs, and global batches from their rows.

The batch's rows are sharded over the data-parallel mesh axes (`sharding.batch_sharding`), and
each process must supply exactly the rows its addressable devices hold. Processes whose devices
hold the same rows (a tensor or fsdp group spanning hosts) load the same rows. `plan` works this
out from the mesh alone, so it runs on the real device-to-host map of a TPU topology (AOT) as well
as on the live job, and refuses layouts the loader shards cannot feed:

  plan = feed.for_config(cfg, mesh)
  it = pipeline.make_train_iterator(cfg.data, ..., shards=plan.shards_of(jax.process_index()))
  batch = feed.global_batch(next(it), plan, mesh)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from maxgemma import sharding
from maxgemma.data import pipeline


@dataclasses.dataclass(frozen=True)
class FeedPlan:
  """Rows and loader shards per process for one (mesh, global batch, loader shards) layout.

  `rows[p]`: the global rows process p's devices hold (ascending); `shards[p]`: the loader shards
  whose rows those are (ascending); `owner[j]`: the lowest process running loader shard j (the
  one that writes its position to checkpoints).
  """
  global_batch: int
  loader_shards: int
  data_parallel: int
  rows: dict[int, tuple[int, ...]]
  shards: dict[int, tuple[int, ...]]
  owner: dict[int, int]

  @property
  def rows_per_shard(self) -> int:
    return self.global_batch // self.loader_shards

  def shards_of(self, process: int) -> tuple[int, ...]:
    return self.shards[process]

  def owned_by(self, process: int) -> tuple[int, ...]:
    return tuple(j for j in self.shards[process] if self.owner[j] == process)

  def hosts_per_row(self) -> dict[int, int]:
    """Global row -> how many processes load it."""
    count: collections.Counter = collections.Counter()
    for rows in self.rows.values():
      count.update(rows)
    return dict(count)

  def describe(self, max_hosts: int = 8) -> str:
    """A few lines: hosts, rows per host, hosts per row, and the first hosts' loader shards."""
    share = collections.Counter(self.hosts_per_row().values())
    per_host = collections.Counter(len(r) for r in self.rows.values())
    lines = [f"data feed: {len(self.rows)} hosts, global batch {self.global_batch} rows in "
             f"{self.loader_shards} loader shards of {self.rows_per_shard} row(s), "
             f"data-parallel size {self.data_parallel}",
             "  rows loaded per host: " + ", ".join(f"{n} ({h} hosts)"
                                                    for n, h in sorted(per_host.items())),
             "  hosts loading each row: " + ", ".join(f"{n} ({r} rows)"
                                                      for n, r in sorted(share.items()))]
    for p in sorted(self.rows)[:max_hosts]:
      lines.append(f"  host {p}: rows {_ranges(self.rows[p])}, loader shards "
                   f"{_ranges(self.shards[p])}")
    if len(self.rows) > max_hosts:
      lines.append(f"  ... {len(self.rows) - max_hosts} more hosts")
    return "\n".join(lines)


def _ranges(values: tuple[int, ...]) -> str:
  """(0, 1, 2, 5) -> '0-2, 5'."""
  out, start = [], None
  for i, v in enumerate(values):
    if start is None:
      start = v
    if i + 1 == len(values) or values[i + 1] != v + 1:
      out.append(f"{start}" if start == v else f"{start}-{v}")
      start = None
  return ", ".join(out)


def data_parallel_size(mesh: Mesh) -> int:
  """How many distinct row blocks the batch is split into (the batch axes, ICI x DCN)."""
  return math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """One line naming `train.global_batch` and the mesh keys when the batch cannot be split."""
  dp, k, B = data_parallel_size(mesh), int(grad_accum_steps), int(global_batch)
  if B % dp or B % k or (B // k) % dp:
    raise ValueError(f"train.global_batch ({B}) must be divisible by the data-parallel size "
                     f"{dp} (data x fsdp = "
                     f"{' x '.join(str(mesh.shape[a]) for a in sharding.BATCH_AXES)}, each ICI x "
                     f"DCN: mesh.ici_data, mesh.dcn_data, mesh.ici_fsdp, mesh.dcn_fsdp) and by "
                     f"optim.grad_accum_steps ({k}) into micro-batches that still are; try "
                     f"train.global_batch={dp * k * max(1, B // (dp * k))}")


@functools.lru_cache(maxsize=16)  # asked every step by global_batch; the result is only read
def device_rows(mesh: Mesh, global_batch: int) -> dict[Any, range]:
  """Device -> the global rows it holds under the batch sharding."""
  index_map = sharding.batch_sharding(mesh).devices_indices_map((global_batch, 1))
  return {d: range(*idx[0].indices(global_batch)) for d, idx in index_map.items()}


def plan(mesh: Mesh, global_batch: int, loader_shards: int, grad_accum_steps: int = 1
         ) -> FeedPlan:
  """The feed of `mesh` (its devices' `process_index` is the host map); raises ValueError with a
  one-line fix when the global batch or the loader shards do not fit the layout.

  `loader_shards` is the resolved count (`pipeline.loader_shard_count`)."""
  check_batch(global_batch, mesh, grad_accum_steps)
  B, S = int(global_batch), int(loader_shards)
  if S < 1 or B % S:
    raise ValueError(f"config.data.loader_shards={S} must divide train.global_batch={B}")
  rows: dict[int, set[int]] = collections.defaultdict(set)
  for device, r in device_rows(mesh, B).items():
    rows[device.process_index].update(r)
  per = B // S
  shards: dict[int, tuple[int, ...]] = {}
  for p, held in rows.items():
    mine = []
    for j in sorted({r // per for r in held}):
      block = set(range(j * per, (j + 1) * per))
      if not block <= held:
        raise ValueError(
            f"config.data.loader_shards={S}: loader shard {j} (rows {j * per}-{(j + 1) * per - 1})"
            f" is split between processes, process {p} holds only {len(block & held)} of its "
            f"{per} rows on this mesh; use a multiple of {_needed_shards(rows, B)} that divides "
            f"train.global_batch={B} (or 0: one loader shard per row)")
      mine.append(j)
    shards[p] = tuple(mine)
  owner: dict[int, int] = {}
  for p in sorted(shards):
    for j in shards[p]:
      owner.setdefault(j, p)
  return FeedPlan(B, S, data_parallel_size(mesh), {p: tuple(sorted(r)) for p, r in rows.items()},
                  shards, owner)


def for_config(cfg: Any, mesh: Mesh) -> FeedPlan:
  """`plan` for a whole config: `train.global_batch`, `data.loader_shards`, grad accumulation."""
  B = int(cfg.train.global_batch)
  return plan(mesh, B, pipeline.loader_shard_count(cfg.data, B),
              int(cfg.optim.get("grad_accum_steps", 1)))


def _needed_shards(rows: dict[int, set[int]], global_batch: int) -> int:
  """The fewest loader shards whose row blocks never straddle two processes' row sets."""
  for s in range(1, global_batch + 1):
    if global_batch % s:
      continue
    per = global_batch // s
    if all(set(range((r // per) * per, (r // per + 1) * per)) <= held
           for held in rows.values() for r in held):
      return s
  return global_batch


def global_batch(local: dict[str, np.ndarray], feed_plan: FeedPlan, mesh: Mesh
                 ) -> dict[str, jax.Array]:
  """Global arrays sharded over the batch from this process's rows (its loader shards' rows,
  in shard order, as the iterator gives them)."""
  me = jax.process_index()
  where = {r: i for i, r in enumerate(feed_plan.rows[me])}
  batch_sharding = sharding.batch_sharding(mesh)
  rows_of = {d: r for d, r in device_rows(mesh, feed_plan.global_batch).items()
             if d.process_index == me}
  out = {}
  for key, value in local.items():
    if value.shape[0] != len(where):
      raise ValueError(f"batch {key!r} has {value.shape[0]} rows, process {me} holds "
                       f"{len(where)} of the global batch")
    shape = (feed_plan.global_batch, *value.shape[1:])
    arrays = [jax.device_put(value[where[r.start]:where[r.start] + len(r)], d)
              for d, r in rows_of.items()]
    out[key] = jax.make_array_from_single_device_arrays(shape, batch_sharding, arrays)
  return out
