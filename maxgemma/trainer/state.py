"""Train state created already sharded: `jit` of the initialiser with `out_shardings`.

The state is a plain dict `{"step", "params", "opt_state"}`. Parameters follow the rules table with
`mesh.shard_params`; the optimizer state always shards like ZeRO-3 parameters (over `fsdp`).
Frozen inputs (a teacher's parameters, say) shard like parameters and are never updated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxgemma import sharding
from maxgemma.model.config import ModelConfig
from maxgemma.model.gemma import Transformer

State = dict[str, Any]


def _init_tokens() -> jax.Array:
  return jnp.zeros((1, 8), jnp.int32)  # parameter shapes do not depend on the input's


def abstract_params(model_cfg: ModelConfig) -> Any:
  """Boxed (logically annotated) parameter shapes, without allocating anything."""
  model = Transformer(model_cfg)
  return jax.eval_shape(model.init, jax.random.key(0), _init_tokens())["params"]


def init_params(model_cfg: ModelConfig, rng: jax.Array) -> Any:
  """Freshly initialised (unboxed) parameters."""
  return nn.unbox(Transformer(model_cfg).init(rng, _init_tokens())["params"])


def state_shardings(boxed_params: Any, tx: optax.GradientTransformation, mesh: Mesh,
                    mesh_cfg: ml_collections.ConfigDict | None = None
                    ) -> tuple[State, State]:
  """(abstract state, its NamedShardings) for boxed parameter shapes; refuses large leaves left
  replicated by mistake."""
  params = nn.unbox(boxed_params)
  param_sh = sharding.tree_shardings(boxed_params, mesh, sharding.rules_for(mesh_cfg, params=True))
  opt_param_sh = sharding.tree_shardings(boxed_params, mesh,
                                         sharding.rules_for(mesh_cfg, params=False))
  opt_state = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_state, opt_param_sh,
                                 transform_non_params=lambda _: replicated)
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
              "opt_state": opt_state}
  shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh}
  if mesh_cfg is None or mesh_cfg.get("shard_params", True):
    sharding.check_sufficiently_sharded(param_sh, params, mesh, "parameter")
  sharding.check_sufficiently_sharded(opt_sh, opt_state, mesh, "optimizer state")
  return abstract, shardings


def frozen_shardings(boxed: Any, mesh: Mesh, mesh_cfg: ml_collections.ConfigDict | None = None
                     ) -> tuple[Any, Any]:
  """(abstract frozen inputs, their NamedShardings): the parameter rules, sharding checked."""
  abstract = nn.unbox(boxed)
  shardings = sharding.tree_shardings(boxed, mesh, sharding.rules_for(mesh_cfg, params=True))
  if mesh_cfg is None or mesh_cfg.get("shard_params", True):
    sharding.check_sufficiently_sharded(shardings, abstract, mesh, "frozen input")
  return abstract, shardings


def create_state(init: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 shardings: State, seed: int) -> State:
  """Initialises parameters (`init(rng)`) and optimizer state directly into their shardings."""
  def make(rng):
    params = init(rng)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  return jax.jit(make, out_shardings=shardings)(jax.random.key(seed))
