"""Knowledge-distillation losses: a teacher's logits (online) or its sampled top-k (offline).

Shape letters: B batch, L length, D student d_model, E teacher d_model, V vocab, K sampled ids per
token, C chunks, S positions per chunk.

Like `maxgemma.loss`, every function returns sums, `(loss_sum, weight_sum, aux)`, float32 scalars.
Per token t with loss weight w_t, student logits s_t and next-token target y_t:

  online (teacher logits u_t, temperature tau):
    p_t      = softmax(u_t / tau)                    the teacher's tempered distribution
    CE_t     = -sum_v p_t[v] log softmax(s_t / tau)[v]
    KL_t     = sum_v p_t[v] (log p_t[v] - log softmax(s_t / tau)[v])
    agree_t  = [argmax s_t == argmax u_t]
  offline top-k (sampled ids i_t[k], weights r_t[k] >= 0):
    p_t      = r_t / sum_k r_t[k] on the sampled ids, 0 on every other id
    CE_t     = -sum_k p_t[k] log softmax(s_t)[i_t[k]]
    KL_t     = sum_k p_t[k] (log p_t[k] - log softmax(s_t)[i_t[k]])   (KL to the sampled target)
    agree_t  = [argmax s_t == i_t[argmax_k r_t[k]]]

  loss_sum = sum_t w_t ((1 - alpha) tau^2 CE_t + alpha NLL_t + z_loss lse_t^2)   (tau = 1 offline)
  aux      = {"objective_sum": sum_t w_t ((1 - alpha) tau^2 CE_t + alpha NLL_t),
              "distill_sum": sum_t w_t CE_t,  "kl_sum": sum_t w_t KL_t,
              "nll_sum": sum_t w_t NLL_t,  "z_loss_sum": sum_t w_t z_loss lse_t^2,
              "correct": sum_t w_t [argmax s_t == y_t],  "agree": sum_t w_t agree_t}

with NLL_t = lse_t - s_t[y_t] the next-token cross-entropy and lse_t = logsumexp_v s_t[v] (both at
temperature 1). The tau^2 factor keeps the distillation gradient's scale independent of tau
(Hinton et al.). No gradient flows into the teacher's logits. A token whose sampled weights sum to
0 (padding) has p_t = 0.

The chunked forms take hidden states and tied embeddings instead of logits and compute one chunk
of [B, S, V] float32 logits per model at a time (`maxgemma.loss.chunked_cross_entropy`'s scheme:
the chunk body is rematerialised in the backward pass).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from maxgemma.loss import output_logits, strided_chunks

Array = jax.Array
AUX_KEYS = ("objective_sum", "distill_sum", "kl_sum", "nll_sum", "z_loss_sum", "correct",
            "agree")


def _lead_check(name: str, x: Array, lead: tuple[int, ...]) -> None:
  if tuple(x.shape[:len(lead)]) != lead:
    raise ValueError(f"{name} must have leading shape {lead}, got {tuple(x.shape)}")


def _weights(weights_BL: Array | None, lead: tuple[int, ...]) -> Array:
  if weights_BL is None:
    return jnp.ones(lead, jnp.float32)
  _lead_check("weights", weights_BL, lead)
  return weights_BL.astype(jnp.float32)


def _student_terms(logits_BLV: Array, targets_BL: Array, weights_BL: Array, z_loss: float
                   ) -> tuple[Array, Array, dict[str, Array]]:
  """(log_softmax at temperature 1, lse, next-token sums) of the student's logits."""
  if not jnp.issubdtype(targets_BL.dtype, jnp.integer):
    raise ValueError(f"targets must be integers, got dtype {targets_BL.dtype}")
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  nll_BL = lse_BL - target_logit_BL
  pred_BL = jnp.argmax(logits_BLV, axis=-1)
  sums = {"nll_sum": jnp.sum(weights_BL * nll_BL),
          "z_loss_sum": jnp.sum(weights_BL * z_loss * jnp.square(lse_BL)),
          "correct": jnp.sum(weights_BL * (pred_BL == targets_BL))}
  return lse_BL, pred_BL, sums


def _combine(ce_BL: Array, kl_BL: Array, agree_BL: Array, weights_BL: Array,
             student: dict[str, Array], alpha: float, scale: float
             ) -> tuple[Array, Array, dict[str, Array]]:
  distill_sum = jnp.sum(weights_BL * ce_BL)
  objective = (1.0 - alpha) * scale * distill_sum + alpha * student["nll_sum"]
  aux = {"objective_sum": objective, "distill_sum": distill_sum,
         "kl_sum": jnp.sum(weights_BL * kl_BL), **student,
         "agree": jnp.sum(weights_BL * agree_BL)}
  return objective + student["z_loss_sum"], jnp.sum(weights_BL), aux


def _check_mix(temperature: float, alpha: float) -> None:
  if not temperature > 0:
    raise ValueError(f"distill.temperature must be > 0, got {temperature}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"distill.alpha (the next-token loss's share) must be in [0, 1], got {alpha}")


def distill_cross_entropy(logits_BLV: Array, teacher_logits_BLV: Array, targets_BL: Array,
                          weights_BL: Array | None = None, *, temperature: float = 1.0,
                          alpha: float = 0.0, z_loss: float = 0.0
                          ) -> tuple[Array, Array, dict[str, Array]]:
  """Online distillation sums from both models' logits, in float32 (module docstring)."""
  _check_mix(temperature, alpha)
  lead = tuple(logits_BLV.shape[:-1])
  if tuple(teacher_logits_BLV.shape) != tuple(logits_BLV.shape):
    raise ValueError(f"teacher logits {tuple(teacher_logits_BLV.shape)} and student logits "
                     f"{tuple(logits_BLV.shape)} differ: teacher and student need one vocabulary")
  _lead_check("targets", targets_BL, lead)
  weights_BL = _weights(weights_BL, lead)
  logits_BLV = logits_BLV.astype(jnp.float32)
  teacher_BLV = jax.lax.stop_gradient(teacher_logits_BLV.astype(jnp.float32))
  _, pred_BL, student = _student_terms(logits_BLV, targets_BL, weights_BL, z_loss)
  log_q_BLV = jax.nn.log_softmax(logits_BLV / temperature, axis=-1)
  log_p_BLV = jax.nn.log_softmax(teacher_BLV / temperature, axis=-1)
  p_BLV = jnp.exp(log_p_BLV)
  ce_BL = -jnp.sum(p_BLV * log_q_BLV, axis=-1)
  kl_BL = jnp.sum(p_BLV * (log_p_BLV - log_q_BLV), axis=-1)
  agree_BL = (pred_BL == jnp.argmax(teacher_BLV, axis=-1)).astype(jnp.float32)
  return _combine(ce_BL, kl_BL, agree_BL, weights_BL, student, alpha, temperature ** 2)


def topk_cross_entropy(logits_BLV: Array, ids_BLK: Array, topk_weights_BLK: Array,
                       targets_BL: Array, weights_BL: Array | None = None, *,
                       alpha: float = 0.0, z_loss: float = 0.0
                       ) -> tuple[Array, Array, dict[str, Array]]:
  """Offline top-k distillation sums: cross-entropy over the sampled support, renormalised."""
  _check_mix(1.0, alpha)
  lead = tuple(logits_BLV.shape[:-1])
  V = logits_BLV.shape[-1]
  _lead_check("targets", targets_BL, lead)
  _lead_check("topk ids", ids_BLK, lead)
  if tuple(topk_weights_BLK.shape) != tuple(ids_BLK.shape):
    raise ValueError(f"topk weights {tuple(topk_weights_BLK.shape)} must match topk ids "
                     f"{tuple(ids_BLK.shape)}")
  if ids_BLK.shape[-1] > V:
    raise ValueError(f"k={ids_BLK.shape[-1]} sampled ids per token exceeds the vocabulary ({V})")
  weights_BL = _weights(weights_BL, lead)
  logits_BLV = logits_BLV.astype(jnp.float32)
  lse_BL, pred_BL, student = _student_terms(logits_BLV, targets_BL, weights_BL, z_loss)
  r_BLK = jnp.maximum(topk_weights_BLK.astype(jnp.float32), 0.0)
  total_BL = jnp.sum(r_BLK, axis=-1, keepdims=True)
  p_BLK = jnp.where(total_BL > 0, r_BLK / jnp.where(total_BL > 0, total_BL, 1.0), 0.0)
  log_q_BLK = jnp.take_along_axis(logits_BLV, ids_BLK, axis=-1) - lse_BL[..., None]
  ce_BL = -jnp.sum(p_BLK * log_q_BLK, axis=-1)
  log_p_BLK = jnp.log(jnp.where(p_BLK > 0, p_BLK, 1.0))
  kl_BL = jnp.sum(p_BLK * (log_p_BLK - log_q_BLK), axis=-1)
  best_BL = jnp.take_along_axis(ids_BLK, jnp.argmax(r_BLK, axis=-1)[..., None], axis=-1)[..., 0]
  agree_BL = (pred_BL == best_BL).astype(jnp.float32)
  return _combine(ce_BL, kl_BL, agree_BL, weights_BL, student, alpha, 1.0)


def _chunked(body: Callable[..., tuple[Array, Array, dict[str, Array]]], arrays: tuple[Array, ...],
             chunk_size: int) -> tuple[Array, Array, dict[str, Array]]:
  """Sums of `body(*chunk)` over length chunks of [B, L, ...] `arrays` (zero-padded; the last of
  `arrays` is the loss weights, so padding carries weight 0)."""
  if int(chunk_size) != chunk_size or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
  B, L = arrays[0].shape[:2]
  S = min(int(chunk_size), L)
  C = -(-L // S)
  pad = C * S - L

  def split(x):  # strided chunks: a length (sequence) sharding stays where it is
    if pad:
      x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return strided_chunks(x, C)

  @jax.checkpoint
  def chunk(totals, xs):
    return jax.tree.map(jnp.add, totals, body(*xs)), None

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, {k: zero for k in AUX_KEYS})
  totals, _ = jax.lax.scan(chunk, init, tuple(split(x) for x in arrays))
  return totals


def chunked_distill_cross_entropy(
    hidden_BLD: Array, embedding_VD: Array, teacher_hidden_BLE: Array, teacher_embedding_VE: Array,
    targets_BL: Array, weights_BL: Array | None, *, chunk_size: int, temperature: float = 1.0,
    alpha: float = 0.0, z_loss: float = 0.0, final_softcap: float | None = None,
    teacher_softcap: float | None = None, dtype=jnp.bfloat16, teacher_dtype=jnp.bfloat16,
    flatten: bool = False) -> tuple[Array, Array, dict[str, Array]]:
  """`distill_cross_entropy` of both models' tied-embedding logits, `chunk_size` positions at a
  time: no [B, L, V] logits for either model. Each model's matmul runs in its own `dtype`."""
  B, L, _ = hidden_BLD.shape
  _lead_check("teacher hidden", teacher_hidden_BLE, (B, L))
  if embedding_VD.shape[0] != teacher_embedding_VE.shape[0]:
    raise ValueError(f"student vocabulary {embedding_VD.shape[0]} != teacher vocabulary "
                     f"{teacher_embedding_VE.shape[0]}: teacher and student need one tokenizer")
  _lead_check("targets", targets_BL, (B, L))
  weights_BL = _weights(weights_BL, (B, L))
  teacher_hidden_BLE = jax.lax.stop_gradient(teacher_hidden_BLE)
  teacher_embedding_VE = jax.lax.stop_gradient(teacher_embedding_VE)

  def body(h_BSD, t_BSE, y_BS, w_BS):
    s_BSV = output_logits(h_BSD, embedding_VD, final_softcap, dtype, flatten=flatten)
    u_BSV = output_logits(t_BSE, teacher_embedding_VE, teacher_softcap, teacher_dtype,
                          flatten=flatten)
    return distill_cross_entropy(s_BSV, u_BSV, y_BS, w_BS, temperature=temperature,
                                 alpha=alpha, z_loss=z_loss)

  return _chunked(body, (hidden_BLD, teacher_hidden_BLE, targets_BL, weights_BL), chunk_size)


def chunked_topk_cross_entropy(
    hidden_BLD: Array, embedding_VD: Array, ids_BLK: Array, topk_weights_BLK: Array,
    targets_BL: Array, weights_BL: Array | None, *, chunk_size: int, alpha: float = 0.0,
    z_loss: float = 0.0, final_softcap: float | None = None, dtype=jnp.bfloat16,
    flatten: bool = False) -> tuple[Array, Array, dict[str, Array]]:
  """`topk_cross_entropy` of the student's tied-embedding logits, `chunk_size` positions at a
  time (no [B, L, V] logits)."""
  B, L, _ = hidden_BLD.shape
  if ids_BLK.shape[-1] > embedding_VD.shape[0]:
    raise ValueError(f"k={ids_BLK.shape[-1]} sampled ids per token exceeds the vocabulary "
                     f"({embedding_VD.shape[0]})")
  for name, x in (("topk ids", ids_BLK), ("topk weights", topk_weights_BLK),
                  ("targets", targets_BL)):
    _lead_check(name, x, (B, L))
  weights_BL = _weights(weights_BL, (B, L))

  def body(h_BSD, i_BSK, r_BSK, y_BS, w_BS):
    s_BSV = output_logits(h_BSD, embedding_VD, final_softcap, dtype, flatten=flatten)
    return topk_cross_entropy(s_BSV, i_BSK, r_BSK, y_BS, w_BS, alpha=alpha, z_loss=z_loss)

  return _chunked(body, (hidden_BLD, ids_BLK, topk_weights_BLK, targets_BL, weights_BL),
                  chunk_size)
