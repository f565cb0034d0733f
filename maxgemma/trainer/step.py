"""The train and eval steps: loss over micro-batches, AdamW update, NaN/Inf guard.

Batches are dicts of [B, L] arrays: `tokens`, `targets`, `positions`, `segment_ids`,
`loss_weights`. The loss is normalised by the global token weight of the whole batch, so k
micro-batches give the same update as one batch of the same rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxgemma import loss as loss_lib
from maxgemma import sharding
from maxgemma.model.config import ModelConfig
from maxgemma.model.gemma import Transformer

Batch = dict[str, jax.Array]
State = dict[str, Any]


def loss_sums(model_cfg: ModelConfig, params: Any, batch: Batch, *, z_loss: float = 0.0,
              loss_chunk: int = 0) -> tuple[jax.Array, tuple[jax.Array, dict]]:
  """(loss_sum, (weight_sum, aux)) of one (micro-)batch; `loss_chunk` > 0 avoids full logits."""
  model = Transformer(model_cfg)
  args = (batch["tokens"], batch["positions"], batch["segment_ids"])
  if loss_chunk:
    hidden_BLD = model.apply({"params": params}, *args, return_hidden=True)
    total, weight, aux = loss_lib.chunked_cross_entropy(
        hidden_BLD, params["embedder"]["input_embedding"], batch["targets"],
        batch["loss_weights"], chunk_size=loss_chunk, final_softcap=model_cfg.final_logit_softcap,
        z_loss=z_loss, dtype=jnp.dtype(model_cfg.dtype), flatten=model_cfg.flatten_matmuls)
  else:
    logits_BLV = model.apply({"params": params}, *args)
    total, weight, aux = loss_lib.cross_entropy(logits_BLV, batch["targets"],
                                                batch["loss_weights"], z_loss)
  return total, (weight, aux)


def _microbatches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...], micro-batch i taking rows i, i+k, ...: each stays spread over the
  data-parallel devices (a contiguous split would put each micro-batch on a few of them)."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"train.global_batch ({x.shape[0]}) must be divisible by "
                       f"optim.grad_accum_steps ({k})")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: ml_collections.ConfigDict
                    ) -> Callable[[State, Batch], tuple[State, dict]]:
  """The un-jitted step `(state, batch) -> (state, metrics)`."""
  k = int(cfg.optim.grad_accum_steps)
  z_loss, chunk = float(cfg.optim.z_loss), int(cfg.train.get("loss_chunk", 0))

  def normalised_loss(p, b, denom):  # the batch's token weight is known before the model runs
    total, (weight, aux) = loss_sums(model_cfg, p, b, z_loss=z_loss, loss_chunk=chunk)
    return total / denom, (total, weight, aux)

  grad_fn = jax.grad(normalised_loss, has_aux=True)

  def step(state: State, batch: Batch) -> tuple[State, dict]:
    params = state["params"]
    # Dividing the loss (a scalar) rather than the gradients saves a pass over every gradient.
    denom = jnp.maximum(jnp.sum(batch["loss_weights"].astype(jnp.float32)), 1.0)
    if k == 1:
      grads, (total, weight, aux) = grad_fn(params, batch, denom)
    else:
      def accumulate(carry, micro):
        grads, (total, weight, aux) = carry
        mb_grads, (mb_total, mb_weight, mb_aux) = grad_fn(params, micro, denom)
        grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads, mb_grads)
        return (grads, (total + mb_total, weight + mb_weight,
                        jax.tree.map(jnp.add, aux, mb_aux))), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      sums0 = (jnp.zeros(()), jnp.zeros(()), {"nll_sum": jnp.zeros(()),
                                             "z_loss_sum": jnp.zeros(()), "correct": jnp.zeros(())})
      (grads, (total, weight, aux)), _ = jax.lax.scan(accumulate, (zeros, sums0),
                                                       _microbatches(batch, k))
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    loss = aux["nll_sum"] / denom
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    # A non-finite step changes nothing: the host stops (or skips on) with the state intact.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"step": state["step"] + 1, "params": keep(new_params, params),
                 "opt_state": keep(opt_state, state["opt_state"])}
    metrics = {"loss": loss, "z_loss": aux["z_loss_sum"] / denom,
               "accuracy": aux["correct"] / denom, "grad_norm": grad_norm,
               "param_norm": optax.global_norm(params), "learning_rate": schedule(state["step"]),
               "tokens": weight, "finite": finite}
    return new_state, metrics

  return step


def make_eval_step(model_cfg: ModelConfig) -> Callable[[Any, Batch], dict]:
  """`(params, batch) -> {"nll_sum", "weight"}` for a held-out batch."""
  def step(params, batch):
    _, (weight, aux) = loss_sums(model_cfg, params, batch)
    return {"nll_sum": aux["nll_sum"], "weight": weight}
  return step


def jit_train_step(step: Callable, shardings: State, mesh: Mesh) -> Callable:
  """The step jitted with explicit shardings and donated state (call it inside `rules_scope`)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


@contextlib.contextmanager
def rules_scope(mesh: Mesh, mesh_cfg: ml_collections.ConfigDict | None = None):
  """The mesh and the logical-axis rules in scope, so tracing maps the model's activations."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_for(mesh_cfg, params=True)):
    yield
