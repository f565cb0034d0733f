"""The train and eval steps of an objective: micro-batch accumulation, update, NaN/Inf guard.

The loss is normalised by the weight of the whole batch (`Objective.weight`), so k micro-batches
give the same update as one batch of the same rows. Steps take `(state, batch, frozen)`: `frozen`
holds the objective's frozen inputs (`{}` when it has none).

An objective that trains with randomness (`Objective.needs_rng`: LoRA's adapter dropout) gets a
key per micro-batch made of the seed, the step and the micro-batch index alone, so a resumed run
draws what the straight run drew at the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from maxgemma.trainer.objective import Batch, Objective

State = dict[str, Any]


def _microbatches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...], micro-batch i taking rows i, i+k, ...: each stays spread over the
  data-parallel devices (a contiguous split would put each micro-batch on a few of them)."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"train.global_batch ({x.shape[0]}) must be divisible by "
                       f"optim.grad_accum_steps ({k})")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The key of a training step's randomness: `seed` (`train.seed`) and the step alone."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM), step)


_STREAM = 0x5452  # keeps the steps' keys apart from the initialiser's (jax.random.key(seed))


def make_train_step(objective: Objective, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum_steps: int = 1, seed: int = 0,
                    opt_state_shardings: Any = None
                    ) -> Callable[[State, Batch, Any], tuple[State, dict]]:
  """The un-jitted step `(state, batch, frozen) -> (state, metrics)`; `seed` (`train.seed`)
  seeds the objective's randomness, if it has any (`Objective.needs_rng`). With
  `opt_state_shardings` (device-memory shardings of an optimizer state that arrives in host
  memory) the step moves the state onto the devices before the update."""
  k = int(grad_accum_steps)
  random = bool(objective.needs_rng)

  def normalised_loss(p, b, frozen, denom, rng=None):  # the weight is known before the model runs
    if random:
      total, weight, sums = objective.train_sums(p, b, frozen, rng)
    else:
      total, weight, sums = objective.loss_sums(p, b, frozen)
    return total / denom, (total, weight, sums)

  grad_fn = jax.grad(normalised_loss, has_aux=True)

  def step(state: State, batch: Batch, frozen: Any) -> tuple[State, dict]:
    params = state["params"]
    # Dividing the loss (a scalar) rather than the gradients saves a pass over every gradient.
    denom = objective.weight(batch)
    key = step_key(seed, state["step"]) if random else None
    if k == 1:
      rng = None if key is None else jax.random.fold_in(key, 0)
      grads, (total, weight, sums) = grad_fn(params, batch, frozen, denom, rng)
    else:
      def accumulate(carry, xs):
        grads, (total, weight, sums) = carry
        index, micro = xs if random else (None, xs)
        rng = None if key is None else jax.random.fold_in(key, index)
        mb_grads, (mb_total, mb_weight, mb_sums) = grad_fn(params, micro, frozen, denom, rng)
        grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads, mb_grads)
        return (grads, (total + mb_total, weight + mb_weight,
                        jax.tree.map(jnp.add, sums, mb_sums))), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      sums0 = (jnp.zeros(()), jnp.zeros(()), {name: jnp.zeros(()) for name in objective.sums})
      micro = _microbatches(batch, k)
      xs = (jnp.arange(k), micro) if random else micro
      (grads, (total, weight, sums)), _ = jax.lax.scan(accumulate, (zeros, sums0), xs)
    grad_norm = optax.global_norm(grads)
    old_opt_state = state["opt_state"]
    if opt_state_shardings is not None:
      old_opt_state = jax.device_put(old_opt_state, opt_state_shardings)
    updates, opt_state = tx.update(grads, old_opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    # A non-finite step changes nothing: the host stops (or skips on) with the state intact.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"step": state["step"] + 1, "params": keep(new_params, params),
                 "opt_state": keep(opt_state, old_opt_state)}
    metrics = {**objective.metrics(sums, denom), "grad_norm": grad_norm,
               "param_norm": optax.global_norm(params), "learning_rate": schedule(state["step"]),
               "tokens": weight, "finite": finite}
    return new_state, metrics

  return step


def make_eval_step(objective: Objective) -> Callable[[Any, Batch, Any], dict]:
  """`(params, batch, frozen) -> {"nll_sum", "weight"}` for a held-out batch."""
  def step(params, batch, frozen):
    return objective.eval_sums(params, batch, frozen)
  return step
