"""Next-token cross-entropy, materialised or chunked over the sequence (no [B, L, V] logits).

Shape letters: B batch, L length, D d_model, V vocab, C chunks, S positions per chunk.

Both functions return sums, not means, so that the train step can add them up over micro-batches
and devices before dividing: `(loss_sum, weight_sum, aux)`, all float32 scalars, with

  loss_sum   = sum_t w_t * (lse_t - logit_t[target_t] + z_loss * lse_t^2)
  weight_sum = sum_t w_t
  aux        = {"nll_sum":    sum_t w_t * (lse_t - logit_t[target_t]),
                "z_loss_sum": sum_t w_t * z_loss * lse_t^2,      (PaLM's auxiliary z-loss)
                "correct":    sum_t w_t * [argmax_v logit_t == target_t]}

where `lse_t = logsumexp_v logit_t[v]`. `loss_sum` includes the z-loss term; `nll_sum / weight_sum`
is the plain cross-entropy to report.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxgemma.model.layers import einsum

Array = jax.Array


def _check(targets_BL: Array, weights_BL: Array | None, lead: tuple[int, ...]) -> Array:
  if tuple(targets_BL.shape) != lead:
    raise ValueError(f"targets must have shape {lead}, got {tuple(targets_BL.shape)}")
  if not jnp.issubdtype(targets_BL.dtype, jnp.integer):
    raise ValueError(f"targets must be integers, got dtype {targets_BL.dtype}")
  if weights_BL is None:
    return jnp.ones(lead, jnp.float32)
  if tuple(weights_BL.shape) != lead:
    raise ValueError(f"weights must have shape {lead}, got {tuple(weights_BL.shape)}")
  return weights_BL.astype(jnp.float32)


def cross_entropy(logits_BLV: Array, targets_BL: Array, weights_BL: Array | None = None,
                  z_loss: float = 0.0) -> tuple[Array, Array, dict[str, Array]]:
  """Weighted token cross-entropy from logits, in float32: `(loss_sum, weight_sum, aux)`.

  `weights_BL` (None: all ones) masks padding and prompt tokens; see the module docstring.
  """
  weights_BL = _check(targets_BL, weights_BL, tuple(logits_BLV.shape[:-1]))
  logits_BLV = logits_BLV.astype(jnp.float32)
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  nll_BL = lse_BL - target_logit_BL
  z_BL = z_loss * jnp.square(lse_BL)
  correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
  aux = {
      "nll_sum": jnp.sum(weights_BL * nll_BL),
      "z_loss_sum": jnp.sum(weights_BL * z_BL),
      "correct": jnp.sum(weights_BL * correct_BL),
  }
  return jnp.sum(weights_BL * (nll_BL + z_BL)), jnp.sum(weights_BL), aux


def output_logits(hidden_BSD: Array, embedding_VD: Array, final_softcap: float | None,
                  dtype, *, flatten: bool = False) -> Array:
  """Tied-embedding logits in float32, as `Transformer.logits` computes them."""
  matmul = einsum if flatten else jnp.einsum
  logits_BSV = matmul("BSD,VD->BSV", hidden_BSD.astype(dtype), embedding_VD.astype(dtype),
                      preferred_element_type=jnp.float32)
  if final_softcap is not None:
    logits_BSV = final_softcap * jnp.tanh(logits_BSV / final_softcap)
  return logits_BSV


def strided_chunks(x: Array, chunks: int) -> Array:
  """[B, L, ...] (L a multiple of `chunks`) as [chunks, B, L / chunks, ...]: chunk c holds the
  positions c, c + chunks, c + 2 chunks, ..., so a sharding of B or of L stays on those axes."""
  B, L = x.shape[:2]
  return jnp.moveaxis(x.reshape(B, L // chunks, chunks, *x.shape[2:]), 2, 0)


def chunked_cross_entropy(hidden_BLD: Array, embedding_VD: Array, targets_BL: Array,
                          weights_BL: Array | None, *, chunk_size: int,
                          final_softcap: float | None = None, z_loss: float = 0.0,
                          dtype=jnp.bfloat16, flatten: bool = False
                          ) -> tuple[Array, Array, dict[str, Array]]:
  """`cross_entropy(hidden @ embedding.T [soft-capped], ...)` without the [B, L, V] logits.

  The sequence is cut into C chunks of `chunk_size` positions (L is zero-padded up to a multiple,
  with weight 0) and a `lax.scan` computes one chunk's [B, chunk_size, V] float32 logits at a
  time. Chunk c holds the strided positions c, c + C, c + 2C, ...: the batch axis and the major
  part of the length stay where they were, so a batch or sequence sharding of the hidden states
  is kept by every chunk (contiguous chunks would put a length sharding on the scanned axis).
  The chunk body is under `jax.checkpoint`, so the backward pass recomputes each chunk's logits
  instead of saving them: peak memory holds O(B * chunk_size * V) logits instead of O(B * L * V).

  The matmul runs in `dtype` with float32 accumulation (the model's activation dtype: same logits
  as `Transformer.logits`). Pass the embedding in its parameter dtype (float32): it is cast inside
  each chunk, so its gradient is accumulated over the chunks in that dtype.
  """
  B, L, D = hidden_BLD.shape
  if embedding_VD.ndim != 2 or embedding_VD.shape[1] != D:
    raise ValueError(f"embedding must be [vocab, {D}], got {tuple(embedding_VD.shape)}")
  if int(chunk_size) != chunk_size or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
  weights_BL = _check(targets_BL, weights_BL, (B, L))
  S = min(int(chunk_size), L)
  C = -(-L // S)
  pad = C * S - L
  if pad:
    hidden_BLD = jnp.pad(hidden_BLD, ((0, 0), (0, pad), (0, 0)))
    targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
    weights_BL = jnp.pad(weights_BL, ((0, 0), (0, pad)))
  hidden_CBSD, targets_CBS, weights_CBS = (strided_chunks(x, C)
                                           for x in (hidden_BLD, targets_BL, weights_BL))

  @jax.checkpoint
  def chunk(totals, xs):
    hidden_BSD, chunk_targets_BS, chunk_weights_BS = xs
    logits_BSV = output_logits(hidden_BSD, embedding_VD, final_softcap, dtype, flatten=flatten)
    loss, weight, aux = cross_entropy(logits_BSV, chunk_targets_BS, chunk_weights_BS, z_loss)
    return jax.tree.map(jnp.add, totals, (loss, weight, aux)), None

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, {"nll_sum": zero, "z_loss_sum": zero, "correct": zero})
  totals, _ = jax.lax.scan(chunk, init, (hidden_CBSD, targets_CBS, weights_CBS))
  return totals
