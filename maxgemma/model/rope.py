"""Rotary position embedding (the half-split convention of the Gemma checkpoints).

Shape letters: B batch, L length, N heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x_BLNH: jax.Array, positions_BL: jax.Array, base: jax.Array | float,
               scale: jax.Array | float = 1.0) -> jax.Array:
  """Rotates each head's halves by position / scale / base**(2i/H); `base` may be traced."""
  H = x_BLNH.shape[-1]
  inv_freq = 1.0 / (jnp.asarray(base, jnp.float32) ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  inv_freq = inv_freq / jnp.asarray(scale, jnp.float32)
  angle_BLh = positions_BL.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(angle_BLh)[:, :, None, :], jnp.cos(angle_BLh)[:, :, None, :]
  x1, x2 = jnp.split(x_BLNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLNH.dtype)
