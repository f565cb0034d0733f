"""Multi-head attention for Gemma: MHA, GQA and MQA, soft-capping, sliding windows, packing.

Shape letters: B batch, L query length, S key length, D d_model, N query heads, K key/value heads,
G query heads per key/value head (N = K * G), H head dim.

`dot_product_attention` is the one switch over implementations; "xla" is the plain reference every
other implementation is tested against.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from maxgemma.model import attention_kernels, kv_cache
from maxgemma.model.attention_reference import GLOBAL_WINDOW, masked_attention
from maxgemma.model.layers import Einsum, RMSNorm, dense_init
from maxgemma.model.rope import apply_rope

Array = jax.Array


def dot_product_attention(q_BLNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BLS: Array | None,
                          *, softcap: float | None = None, impl: str = "xla",
                          segment_ids_BL: Array | None = None,
                          window: Array | int = GLOBAL_WINDOW,
                          windows: tuple[int, ...] = (GLOBAL_WINDOW,),
                          splash_blocks: tuple[int | bool, ...] = ()) -> Array:
  """softmax(q k^T [soft-capped], masked) v, returning [B, L, N, H]; q must be pre-scaled.

  "xla" uses the dense `mask_BLS` (`attention_reference.masked_attention`). The kernels
  ("dot_product", "splash", "ring": `attention_kernels`) take causal self-attention within
  `segment_ids_BL` and the layer's `window` instead (`mask_BLS` None); given a dense mask
  (decoding) they use the reference.
  """
  if impl != "xla" and mask_BLS is None:
    return attention_kernels.attend(q_BLNH, k_BSKH, v_BSKH, impl=impl,
                                    segment_ids_BL=segment_ids_BL, window=window,
                                    windows=windows, softcap=softcap,
                                    splash_blocks=splash_blocks)
  return masked_attention(q_BLNH, k_BSKH, v_BSKH, mask_BLS, softcap=softcap)


class Attention(nn.Module):
  """Gemma self-attention with the official parameter names (q/kv or fused qkv einsums)."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_model: int
  query_scale: float
  softcap: float | None = None
  use_qk_norm: bool = False
  norm_eps: float = 1e-6
  impl: str = "xla"
  windows: tuple[int, ...] = (GLOBAL_WINDOW,)  # the model's distinct windows (kernel impls)
  splash_blocks: tuple[int | bool, ...] = ()  # ModelConfig.splash_block_sizes() (splash impl)
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD: Array, positions_BL: Array, mask_BLS: Array | None,
               rope_base: Array | float, rope_scale: Array | float,
               cache: kv_cache.Cache | None = None, segment_ids_BL: Array | None = None,
               window: Array | int = GLOBAL_WINDOW) -> Array | tuple[Array, kv_cache.Cache]:
    """[B, L, D] -> [B, L, D]; with a `cache` (decoding) also returns the updated cache.

    With a cache, `mask_BLS` covers the cached slots then the new tokens ([B, L, C + L], see
    `kv_cache.cache_mask`).
    """
    N, K, D, H = self.num_heads, self.num_kv_heads, self.d_model, self.head_dim
    x_BLD = x_BLD.astype(self.dtype)
    einsum = lambda name, shape, axes, init: Einsum(shape, axes, init, self.dtype,
                                                    self.param_dtype, name=name)
    if N == K:  # Multi-head attention: one fused projection, as in the Gemma 1 7B checkpoint.
      q_BLNH, k_BSKH, v_BSKH = einsum("qkv_einsum", (3, N, D, H),
                                      (None, "heads", "embed", "head_dim"),
                                      dense_init(2, (1, 3), 0))("BLD,CNDH->CBLNH", x_BLD)
    else:
      q_BLNH = einsum("q_einsum", (N, D, H), ("heads", "embed", "head_dim"),
                      dense_init(1, (0, 2)))("BLD,NDH->BLNH", x_BLD)
      k_BSKH, v_BSKH = einsum("kv_einsum", (2, K, D, H), (None, "kv_heads", "embed", "head_dim"),
                              dense_init(2, (1, 3), 0))("BSD,CKDH->CBSKH", x_BLD)
    if self.use_qk_norm:
      q_BLNH = RMSNorm(self.norm_eps, "head_dim", self.param_dtype, name="_query_norm")(q_BLNH)
      k_BSKH = RMSNorm(self.norm_eps, "head_dim", self.param_dtype, name="_key_norm")(k_BSKH)
    q_BLNH = apply_rope(q_BLNH, positions_BL, rope_base, rope_scale)
    k_BSKH = apply_rope(k_BSKH, positions_BL, rope_base, rope_scale)
    q_BLNH = q_BLNH * jnp.asarray(self.query_scale, self.dtype)
    q_BLNH = nn.with_logical_constraint(q_BLNH, ("act_batch", "act_length", "act_heads", None))
    new_cache = None
    if cache is not None:
      new_cache = kv_cache.write(cache, k_BSKH, v_BSKH, positions_BL)
      k_BSKH, v_BSKH = kv_cache.extend(cache, k_BSKH, v_BSKH)
    q_BLNH, k_BSKH, v_BSKH = (checkpoint_name(q_BLNH, "qkv_proj"),
                              checkpoint_name(k_BSKH, "qkv_proj"),
                              checkpoint_name(v_BSKH, "qkv_proj"))
    out_BLNH = dot_product_attention(q_BLNH, k_BSKH, v_BSKH, mask_BLS, softcap=self.softcap,
                                     impl=self.impl, segment_ids_BL=segment_ids_BL,
                                     window=window, windows=self.windows,
                                     splash_blocks=self.splash_blocks)
    out_BLNH = checkpoint_name(out_BLNH, "attn_context")
    out_BLD = einsum("attn_vec_einsum", (N, H, D), ("heads", "head_dim", "embed"),
                     dense_init((0, 1), 2))("BLNH,NHD->BLD", out_BLNH)
    return out_BLD if cache is None else (out_BLD, new_cache)
