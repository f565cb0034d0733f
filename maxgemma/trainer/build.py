"""The one wiring of the trainer: config + mesh -> optimizer, schedule, sharded state, jitted steps.

`build(cfg, mesh)` is what `trainer.loop`, the AOT compile (`maxgemma.aot`), the throughput
benchmark and the parallelism tests call, so all of them run the same step. A training mode is an
`Objective` (`trainer.objective`): pass one to `build`, or let the config choose.

  setup = build(cfg, mesh)
  state = setup.create_state(seed=0)
  frozen = setup.load_frozen()
  with setup.scope():
    state, metrics = setup.train_step(state, batch, frozen)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxgemma import config as config_lib
from maxgemma import lora, optim, sharding
from maxgemma.model import attention_kernels
from maxgemma.model.config import ModelConfig
from maxgemma.trainer import distill, dpo
from maxgemma.trainer import objective as objective_lib
from maxgemma.trainer import state as state_lib
from maxgemma.trainer import step as step_lib

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a run, a compile or a test needs to step a model on a mesh.

  `train_step(state, batch, frozen) -> (state, metrics)` is jitted with explicit shardings and
  donates the state; `eval_step(params, batch, frozen) -> {"nll_sum", "weight"}`. Trace or call
  both inside `scope()`, which puts the mesh and the logical-axis rules in effect.
  """

  model_cfg: ModelConfig
  mesh: Mesh
  mesh_cfg: ml_collections.ConfigDict
  objective: objective_lib.Objective
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: State  # ShapeDtypeStructs (no sharding attached)
  shardings: State  # NamedShardings of the state, leaf for leaf
  frozen_abstract: Any
  frozen_shardings: Any
  batch_sharding: NamedSharding
  train_step: Callable[[State, Any, Any], tuple[State, dict]]
  eval_step: Callable[[Any, Any, Any], dict]

  def scope(self) -> contextlib.AbstractContextManager:
    """The mesh and the logical-axis rules, in effect while tracing or running the steps."""
    return sharding.rules_scope(self.mesh, self.mesh_cfg)

  def create_state(self, seed: int) -> State:
    """A freshly initialised state, born in its shardings."""
    return state_lib.create_state(self.objective.init_params, self.tx, self.shardings, seed)

  def load_frozen(self) -> Any:
    """The objective's frozen inputs in their shardings (`{}` when it has none)."""
    return self.objective.load_frozen(self.frozen_shardings)

  def abstract_args(self, global_batch: int, seq_len: int) -> tuple[State, Any, Any]:
    """`train_step`'s arguments (state, batch, frozen) as sharded ShapeDtypeStructs."""
    def attach(tree, shardings):
      return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          tree, shardings)

    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
             for k, v in self.objective.batch_spec(global_batch, seq_len).items()}
    return (attach(self.abstract_state, self.shardings), batch,
            attach(self.frozen_abstract, self.frozen_shardings))


def _host_memory_missing(mesh: Mesh) -> str:
  """'' when the mesh's devices have pinned host memory (or list no memories, as the devices of a
  described TPU topology do); else their platform and memory kinds, for an error message."""
  device = mesh.devices.flat[0]
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except Exception:  # noqa: BLE001
    return ""
  if "pinned_host" in kinds:
    return ""
  return f"{device.platform} devices have none (memories: {', '.join(sorted(kinds))})"


def _check_host_memory(model_cfg: ModelConfig, offload_state: bool, mesh: Mesh) -> None:
  """Refuses offloading activations or the optimizer state on devices without host memory."""
  missing = _host_memory_missing(mesh) if model_cfg.offloads() or offload_state else ""
  if missing and model_cfg.offloads():
    raise ValueError(f"config.model.remat_policy={model_cfg.remat_policy} offloads activations "
                     f"to pinned host memory, which {missing}; save or recompute them instead "
                     "(remat_policy save_names, or remat_names without :offload)")
  if missing:
    raise ValueError(f"config.optim.offload_state=True keeps the optimizer state in pinned host "
                     f"memory, which {missing}; set config.optim.offload_state=False")


def _offloaded(shardings: Any) -> Any:
  """The same shardings in pinned host memory."""
  return jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), shardings)


def build(cfg: ml_collections.ConfigDict, mesh: Mesh,
          objective: objective_lib.Objective | None = None) -> Setup:
  """The trainer's setup for `cfg` on `mesh`; `objective` defaults to the one `cfg` names."""
  config_lib.check_keys(cfg)
  model_cfg = config_lib.model_config(cfg)
  sharding.check_sequence(cfg.train.seq_len, mesh)
  sharding.check_residuals(cfg.train.seq_len, model_cfg.d_model, mesh, cfg.mesh)
  if model_cfg.attention_impl == "splash" and mesh.shape.get("sequence", 1) > 1:
    # The query tiles tile one sequence shard's queries (raises naming the model.splash_* key).
    attention_kernels.splash_block_sizes(int(cfg.train.seq_len), model_cfg.splash_block_sizes(),
                                         mesh.shape["sequence"])
  if objective is None:
    chosen = distill.from_config if distill.enabled(cfg) else objective_lib.from_config
    chosen = dpo.from_config if dpo.enabled(cfg) else chosen
    objective = chosen(cfg, model_cfg)
    if lora.enabled(cfg):
      objective = lora.wrap(cfg, objective)
  offload_state = bool(cfg.optim.offload_state)
  _check_host_memory(model_cfg, offload_state, mesh)
  total = int(cfg.train.steps)
  tx = optim.make_optimizer(cfg.optim, total)
  schedule = optim.learning_rate_schedule(cfg.optim, total)
  abstract, shardings = state_lib.state_shardings(objective.abstract_params(), tx, mesh, cfg.mesh)
  device_opt_shardings = shardings["opt_state"]
  if offload_state:  # kept on the host between steps; the step brings it in and sends it back
    shardings = {**shardings, "opt_state": _offloaded(device_opt_shardings)}
  frozen_abstract, frozen_shardings = state_lib.frozen_shardings(objective.frozen_abstract(),
                                                                 mesh, cfg.mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  step = step_lib.make_train_step(objective, tx, schedule,
                                  grad_accum_steps=int(cfg.optim.grad_accum_steps),
                                  seed=int(cfg.train.seed),
                                  opt_state_shardings=device_opt_shardings if offload_state
                                  else None)
  train_step = jax.jit(step, in_shardings=(shardings, batch_sharding, frozen_shardings),
                       out_shardings=(shardings, replicated), donate_argnums=(0,))
  eval_step = jax.jit(step_lib.make_eval_step(objective),
                      in_shardings=(shardings["params"], batch_sharding, frozen_shardings))
  return Setup(model_cfg=model_cfg, mesh=mesh, mesh_cfg=cfg.mesh, objective=objective, tx=tx,
               schedule=schedule, abstract_state=abstract, shardings=shardings,
               frozen_abstract=frozen_abstract, frozen_shardings=frozen_shardings,
               batch_sharding=batch_sharding, train_step=train_step, eval_step=eval_step)
