"""The device mesh and the one table that maps the model's logical axes onto it.

Mesh axes: `data` (replicated data parallelism), `fsdp` (data parallelism with parameters and
optimizer state sharded, ZeRO-3), `sequence` (activations split along their length; attention
gathers keys and values) and `tensor` (model parallelism). Each axis is DCN x ICI: the DCN
factor (across slices/pods) is the outer, slow part; the ICI factor (inside a slice) the inner part.
With this layout XLA reduces gradients hierarchically: a reduce-scatter inside the slice, then the
smaller cross-slice reduction of the shard.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Parameters use the first block, activations (`act_*`) the second.
# One table, no duplicates: FSDP vs tensor parallelism is the mesh shape, not a different table.
RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # A LoRA adapter's rank (maxgemma.lora): over fsdp where its weight's other axes leave fsdp
    # free (the B of q/k/v/gate/up, the A of o/down), so ZeRO-3 shards those too.
    ("lora_rank", "fsdp"),
    ("act_batch", BATCH_AXES),
    ("act_length", "sequence"),
    ("act_residual_length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
# Megatron-style sequence parallelism of the residual stream (`mesh.shard_residuals`): between the
# attention and feed-forward matmuls the residual is split along its length over `tensor`, so what
# the backward pass saves is not copied on every chip of a tensor group. These rows replace
# RULES' rows of the same name (the length is split over `sequence` first, as everywhere).
SHARDED_RESIDUAL_RULES: tuple[tuple[str, Any], ...] = (
    ("act_residual_length", ("sequence", "tensor")),)
# `mesh.shard_state_over_sequence`: the parameters' (ZeRO-3) and the optimizer state's embed
# dimension is split over fsdp x sequence, so a sequence group does not hold copies of the state
# and reduces its gradients by reduce-scatter; fsdp alone where the dimension does not divide.
STATE_OVER_SEQUENCE = ("fsdp", "sequence")
# Leaves with at least this many elements must not end up fully replicated on a sharded mesh.
LARGE_LEAF = 1 << 20


def rules_for(mesh_cfg: ml_collections.ConfigDict | None = None, *, params: bool = True
              ) -> tuple[tuple[str, Any], ...]:
  """The rules table for `mesh_cfg`: with `shard_params=False` parameters are replicated over
  `fsdp` (ZeRO-1/2: only the optimizer state is sharded); with `shard_residuals` the residual
  stream's length is split over `sequence` x `tensor` (SHARDED_RESIDUAL_RULES); with
  `shard_state_over_sequence` the state's `embed` over `fsdp` x `sequence`. `None`: RULES as
  they are (sampling: a mesh without a `sequence` axis > 1 leaves every length whole)."""
  rules = RULES
  if mesh_cfg is None:
    return rules
  if mesh_cfg.get("shard_residuals", False):
    override = dict(SHARDED_RESIDUAL_RULES)
    rules = tuple((k, override.get(k, v)) for k, v in rules)
  if mesh_cfg.get("shard_state_over_sequence", False):
    rules = tuple((k, STATE_OVER_SEQUENCE if k == "embed" else v) for k, v in rules)
  if params and not mesh_cfg.get("shard_params", True):
    rules = tuple((k, None if k in ("embed", "lora_rank") else v) for k, v in rules)
  return rules


@contextlib.contextmanager
def rules_scope(mesh: Mesh, mesh_cfg: ml_collections.ConfigDict | None = None) -> Iterator[None]:
  """The mesh and the logical-axis rules in scope, so tracing maps the model's activations."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for(mesh_cfg, params=True)):
    yield


def resolve_axes(mesh_cfg: ml_collections.ConfigDict, num_devices: int, num_slices: int = 1
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici_shape, dcn_shape) over MESH_AXES with -1 resolved; clear errors when they do not fit."""
  ici = [int(mesh_cfg.get(f"ici_{a}", 1)) for a in MESH_AXES]
  dcn = [int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES]
  if math.prod(dcn) != num_slices and -1 not in dcn:
    if num_slices == 1 and math.prod(dcn) > 1:
      num_slices = math.prod(dcn)  # fake slices on CPU: the DCN axes split the devices
    else:
      raise ValueError(f"mesh.dcn_* multiply to {math.prod(dcn)} but there are {num_slices} "
                       f"slices; set mesh.{'/'.join('dcn_' + a for a in MESH_AXES)} to multiply "
                       f"to {num_slices}")
  dcn = _fill(dcn, num_slices, "dcn")
  if num_devices % num_slices:
    raise ValueError(f"{num_devices} devices do not split into {num_slices} equal slices")
  ici = _fill(ici, num_devices // num_slices, "ici")
  return tuple(ici), tuple(dcn)


def _fill(sizes: list[int], total: int, kind: str) -> list[int]:
  names = ", ".join(f"mesh.{kind}_{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh.{kind}_* axis may be -1 ('the rest'); got {names}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh.{kind}_* sizes must be positive or -1; got {names}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ValueError(f"{total} devices per {kind} group cannot be split as {names}")
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise ValueError(f"the mesh {names} has {math.prod(sizes)} devices but {total} are "
                     f"available; make the product of mesh.{kind}_* equal {total} (or use -1)")
  return sizes


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """The MESH_AXES mesh, each axis DCN-major then ICI, over `devices` (default all)."""
  devices = list(jax.devices() if devices is None else devices)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  ici, dcn = resolve_axes(mesh_cfg, len(devices), len(slices))
  if devices[0].platform == "tpu":
    # An ICI axis that is no product of torus axes (tensor 4 on v4's 8x16x32) splits one of them
    # (4 neighbours of a ring of 8); only when the plain assignment is impossible.
    for split in (False, True):
      try:
        if len(slices) > 1:
          grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                      allow_split_physical_axes=split)
        else:
          grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=split)
        break
      except NotImplementedError:
        if split:
          raise
  else:
    # Elsewhere the devices are taken in order (process by process): DCN groups are contiguous.
    block = _host_block(mesh_cfg, ici, devices)
    per_slice = np.array(devices, dtype=object).reshape(math.prod(dcn), -1)
    ici_grids = [_lay_hosts(list(row), ici, block) for row in per_slice]
    grid = np.stack(ici_grids).reshape(*dcn, *ici)
    n = len(MESH_AXES)  # (dcn_0, .., dcn_n-1, ici_0, .., ici_n-1) -> (dcn_0, ici_0, dcn_1, ...)
    grid = grid.transpose([k for a in range(n) for k in (a, n + a)])
    grid = grid.reshape([d * i for d, i in zip(dcn, ici, strict=True)])
  return Mesh(grid, MESH_AXES)


def _host_block(mesh_cfg: ml_collections.ConfigDict, ici: Sequence[int], devices: Sequence[Any]
                ) -> tuple[int, int] | None:
  """`mesh.host_block` ("FxT", CPU only) checked against the ICI grid and devices per process."""
  spec = str(mesh_cfg.get("host_block", "") or "")
  if not spec:
    return None
  try:
    f, t = (int(x) for x in spec.lower().split("x"))
  except ValueError:
    raise ValueError(f"mesh.host_block={spec!r} is not FxT (e.g. 2x2)") from None
  local = sum(1 for d in devices if d.process_index == devices[0].process_index)
  fsdp, tensor = ici[MESH_AXES.index("fsdp")], ici[MESH_AXES.index("tensor")]
  if f * t != local or fsdp % f or tensor % t:
    raise ValueError(f"mesh.host_block={spec}: a {f}x{t} block must hold one process's {local} "
                     f"devices and tile the ICI fsdp x tensor grid {fsdp}x{tensor}; choose F, T "
                     "with F*T = devices per process dividing mesh.ici_fsdp and mesh.ici_tensor")
  return f, t


def _lay_hosts(devices: list[Any], ici: Sequence[int], block: tuple[int, int] | None
               ) -> np.ndarray:
  """One slice's ICI grid over MESH_AXES: devices in order, or with `block`, each process's
  devices an F x T block of the fsdp x tensor plane (one per data and sequence index), as a v5e
  host's 2 x 2 chips in the torus."""
  if block is None:
    return np.array(devices, dtype=object).reshape(ici)
  f, t = block
  data, fsdp, seq, tensor = (ici[MESH_AXES.index(a)]
                             for a in ("data", "fsdp", "sequence", "tensor"))
  grid = np.empty((data, fsdp, seq, tensor), dtype=object)
  hosts = iter(np.array(devices, dtype=object).reshape(-1, f, t))
  for d in range(data):
    for i in range(0, fsdp, f):
      for s in range(seq):
        for j in range(0, tensor, t):
          grid[d, i:i + f, s, j:j + t] = next(hosts)
  return grid


def split_axes(axes: str | Sequence[str] | None, mesh: Mesh) -> tuple[str, ...]:
  """A rules-table entry (one mesh axis, several, or None) as the tuple of its mesh axes that
  actually split (size > 1 on `mesh`)."""
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def mesh_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
              rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
  """The mesh PartitionSpec for one array. A dimension is split over the longest leading run of
  its rule's axes whose product divides it (none: replicated)."""
  if logical is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(logical, shape, strict=True):
    axes = tuple(a for a in split_axes(table.get(name) if name is not None else None, mesh)
                 if a not in used)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    if axes:
      used.update(axes)
      out.append(axes[0] if len(axes) == 1 else axes)
    else:
      out.append(None)
  return PartitionSpec(*out)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of boxed (logically annotated) abstract arrays, unboxed."""
  logical = nn.get_partition_spec(abstract_tree)
  shapes = nn.unbox(abstract_tree)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, mesh_spec(spec, x.shape, mesh, rules)),
      logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def check_sequence(seq_len: int, mesh: Mesh) -> None:
  """One line naming `train.seq_len` and the mesh keys when the `sequence` axis does not divide
  the length."""
  P, L = mesh.shape.get("sequence", 1), int(seq_len)
  if L % P:
    raise ValueError(f"train.seq_len ({L}) must be divisible by the sequence axis {P} "
                     f"(mesh.ici_sequence x mesh.dcn_sequence); try train.seq_len="
                     f"{P * max(1, L // P)} or a sequence axis dividing {L}")


def check_residuals(seq_len: int, d_model: int, mesh: Mesh,
                    mesh_cfg: ml_collections.ConfigDict) -> None:
  """One line naming `mesh.shard_residuals` and the key to change when the mesh axes the residual
  stream's length (or embedding) is split over do not divide it: the compiler would otherwise pad
  the shards silently (uneven shards, more memory than planned)."""
  if not mesh_cfg.get("shard_residuals", False):
    return
  table = dict(rules_for(mesh_cfg))
  for name, dim, key in (("act_residual_length", int(seq_len), "train.seq_len"),
                         ("act_embed", int(d_model), "the model's d_model")):
    axes = split_axes(table.get(name), mesh)
    n = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % n:
      keys = " x ".join(f"mesh.ici_{a} x mesh.dcn_{a}" for a in axes)
      raise ValueError(f"mesh.shard_residuals splits the residual stream's {name} ({key}="
                       f"{dim}) over {' x '.join(axes)} = {n} devices ({keys}), which does not "
                       f"divide it; use a {key} divisible by {n}, other mesh sizes, or "
                       "mesh.shard_residuals=False")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, length] inputs: batch over the data-parallel axes, each row whole on every device
  of a `sequence` group (the model's first length constraint slices it; so a process feeds whole
  rows, as for a `tensor` group)."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_sufficiently_sharded(shardings: Any, abstract: Any, mesh: Mesh, what: str = "state"
                               ) -> None:
  """Refuses a large leaf left fully replicated on a mesh that could shard it."""
  if mesh.size == 1 or mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
    return
  flat = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract))
  for (path, x), sharding in zip(flat, jax.tree.leaves(shardings), strict=True):
    if x.size >= LARGE_LEAF and all(p is None for p in sharding.spec):
      raise ValueError(
          f"{what} leaf {jax.tree_util.keystr(path)} {tuple(x.shape)} would be fully replicated "
          f"on mesh {dict(mesh.shape)}: no dimension divides the fsdp/tensor axes under "
          f"maxgemma.sharding.RULES; change the mesh shape or the model sizes so one does")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows of every input into global arrays sharded over the batch."""
  sharding = batch_sharding(mesh)
  n = jax.process_count()
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n, *v.shape[1:]))
          for k, v in local.items()}
