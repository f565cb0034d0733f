"""The plain attention every implementation is tested against, its mask and the window encoding.

A leaf of the model package: `attention` (the module and the impl switch) and `attention_kernels`
(the fused kernels) both import it, and it imports neither.

A layer's window is always an int: `q - k < window` keys are attended. A global layer has the
window `GLOBAL_WINDOW`, larger than any sequence, so the same comparison serves both kinds of layer
and a traced per-layer window (under the scanned layers) takes the same values as a static one.

Shape letters: B batch, L query length, S key length, N query heads, K key/value heads,
G query heads per key/value head (N = K * G), H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# The window of a global layer: no sequence reaches it, so `q - k < GLOBAL_WINDOW` always holds.
GLOBAL_WINDOW = 2**30


def is_global(window: int) -> bool:
  """Whether a static window is the global one."""
  return int(window) >= GLOBAL_WINDOW


def static_window(window: Array | int) -> int | None:
  """The window as a Python int when it is static (an int or a 0-d numpy array), else None."""
  if window is None:
    raise ValueError("attention window None: a global layer's window is GLOBAL_WINDOW "
                     "(maxgemma.model.attention_reference), not None")
  if isinstance(window, (int, np.integer)):
    return int(window)
  if isinstance(window, np.ndarray) and window.ndim == 0:
    return int(window)
  return None


def attention_mask(q_pos_BL: Array, k_pos_BS: Array, q_seg_BL: Array, k_seg_BS: Array,
                   window: Array | int = GLOBAL_WINDOW) -> Array:
  """[B, L, S] bool: causal, same segment and `q_pos - k_pos < window`."""
  delta_BLS = q_pos_BL[:, :, None] - k_pos_BS[:, None, :]
  mask_BLS = (delta_BLS >= 0) & (q_seg_BL[:, :, None] == k_seg_BS[:, None, :])
  w = static_window(window)
  if w is None or not is_global(w):
    mask_BLS &= delta_BLS < window
  return mask_BLS


def masked_logits(q_BLKGH: Array, k_BSKH: Array, mask_BLS: Array,
                  softcap: float | None = None) -> Array:
  """q k^T per key/value head's query group, in float32, soft-capped, masked keys at the float32
  minimum: [B, K, G, L, S]."""
  logits_BKGLS = jnp.einsum("BLKGH,BSKH->BKGLS", q_BLKGH, k_BSKH,
                            preferred_element_type=jnp.float32)
  if softcap is not None:
    logits_BKGLS = jnp.tanh(logits_BKGLS / softcap) * softcap
  return jnp.where(mask_BLS[:, None, None], logits_BKGLS, jnp.finfo(jnp.float32).min)


def masked_attention(q_BLNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BLS: Array, *,
                     softcap: float | None = None) -> Array:
  """softmax(q k^T [soft-capped], masked) v, [B, L, N, H]; q pre-scaled, logits in float32."""
  B, L, N, H = q_BLNH.shape
  K = k_BSKH.shape[2]
  q_BLKGH = q_BLNH.reshape(B, L, K, N // K, H)
  logits_BKGLS = masked_logits(q_BLKGH, k_BSKH, mask_BLS, softcap)
  probs_BKGLS = jax.nn.softmax(logits_BKGLS, axis=-1).astype(v_BSKH.dtype)
  out_BLKGH = jnp.einsum("BKGLS,BSKH->BLKGH", probs_BKGLS, v_BSKH)
  return out_BLKGH.reshape(B, L, N, H)


def self_attention(q_BLNH: Array, k_BSKH: Array, v_BSKH: Array, segment_ids_BL: Array | None,
                   window: Array | int = GLOBAL_WINDOW, softcap: float | None = None) -> Array:
  """Causal self-attention within segments (None: one per row) and `window`: [B, L, N, H]."""
  B, L = q_BLNH.shape[:2]
  idx_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
  seg_BL = jnp.ones((B, L), jnp.int32) if segment_ids_BL is None else segment_ids_BL
  mask_BLS = attention_mask(idx_BL, idx_BL, seg_BL, seg_BL, window)
  return masked_attention(q_BLNH, k_BSKH, v_BSKH, mask_BLS, softcap=softcap)
