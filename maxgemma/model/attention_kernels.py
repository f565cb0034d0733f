"""Fused attention implementations behind `attention.dot_product_attention`'s `impl` switch.

- "dot_product": `jax.nn.dot_product_attention`. On a GPU with bfloat16/float16 inputs it asks for
  `implementation="cudnn"` (the cuDNN flash kernel: causal mask and the left sliding window are
  native, segment ids go in as the boolean `mask`, which cuDNN turns into a [B, 1, L, S] bias);
  elsewhere `implementation=None`, JAX's XLA path. It has no logit soft-capping.
- "splash": the Pallas splash-attention kernel for TPU (`make_splash_mha`: `CausalMask` or a
  causal `LocalMask`, `SegmentIds`, `attn_logits_soft_cap`), in a `shard_map` over the batch and
  head axes of the mesh in scope. Off a TPU it runs only in Pallas interpret mode (tests).

Both take what the kernels need instead of a dense mask: segment ids and the layer's window.
Under the scanned layers the window is a traced per-layer value, while a kernel needs it static:
`lax.switch` picks, at run time, between one branch per distinct window of the model (each branch
static; only the selected one runs). Unrolled layers pass a static window and need no switch.
Whatever a kernel cannot do falls back to the "xla" reference with the reason logged once.

Shape letters: B batch, L query length, S key length, N query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maxgemma.model import attention as attention_lib

Array = jax.Array
Window = int | None
log = logging.getLogger(__name__)
KERNEL_IMPLS = ("dot_product", "splash")
_logged: set[str] = set()


def _fallback_warning(impl: str, reason: str) -> None:
  if (impl, reason) not in _logged:
    _logged.add((impl, reason))
    log.warning("attention_impl %r falls back to 'xla': %s", impl, reason)


def static_window(window) -> tuple[bool, Window]:
  """(is_static, window or None for global) of a per-layer window value."""
  if isinstance(window, (int, np.integer)) or window is None:
    w = None if window is None or int(window) >= attention_lib.GLOBAL_WINDOW else int(window)
    return True, w
  if isinstance(window, np.ndarray) and window.ndim == 0:
    return static_window(int(window))
  return False, None


def _reference(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window: Window, softcap) -> Array:
  B, L = q_BLNH.shape[:2]
  idx_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
  seg_BL = jnp.ones((B, L), jnp.int32) if segment_ids_BL is None else segment_ids_BL
  mask_BLS = attention_lib.attention_mask(idx_BL, idx_BL, seg_BL, seg_BL, window)
  return attention_lib.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, mask_BLS, softcap=softcap)


def attend(q_BLNH: Array, k_BSKH: Array, v_BSKH: Array, *, impl: str,
           segment_ids_BL: Array | None, window, windows: Sequence[Window] = (None,),
           softcap: float | None = None, interpret: bool = False) -> Array:
  """Causal self-attention (q pre-scaled) within segments and the layer's `window`: [B, L, N, H].

  `window` is the layer's window (int, GLOBAL_WINDOW/None for global, or a traced scalar taking
  one of the values of `windows`, the model's distinct windows with None for global).
  """
  if impl not in KERNEL_IMPLS:
    raise ValueError(f"unknown kernel attention_impl {impl!r}; known: {', '.join(KERNEL_IMPLS)}")
  kernel = {"dot_product": _dot_product, "splash": _splash}[impl]
  fn = functools.partial(kernel, softcap=softcap, interpret=interpret)
  is_static, w = static_window(window)
  if is_static:
    return fn(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, w)
  distinct = sorted({static_window(x)[1] or attention_lib.GLOBAL_WINDOW for x in windows})
  if len(distinct) == 1:
    w = None if distinct[0] >= attention_lib.GLOBAL_WINDOW else distinct[0]
    return fn(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, w)
  # One static branch per distinct window; the traced window selects the branch at run time.
  index = jnp.argmax(jnp.asarray(window) == jnp.asarray(distinct, jnp.int32))
  branches = [
      functools.partial(lambda q, k, v, s, w: fn(q, k, v, s, w),
                        w=None if x >= attention_lib.GLOBAL_WINDOW else x) for x in distinct]
  return jax.lax.switch(index, branches, q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)


def target_platform() -> str:
  """The platform compiled for: the devices of the mesh in scope (an AOT compile for a TPU
  topology on a CPU host says "tpu"), else the default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return getattr(device, "platform", None) or jax.default_backend()


# ---------------------------------------------------------------- jax.nn.dot_product_attention


def dot_product_backend(dtype) -> str | None:
  """The `implementation` to ask for: "cudnn" on a GPU with a 16-bit dtype, else None (XLA)."""
  if target_platform() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return None


def _dot_product(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window: Window, *, softcap,
                 interpret: bool = False) -> Array:
  del interpret
  if softcap is not None:
    _fallback_warning("dot_product", "jax.nn.dot_product_attention has no logit soft-capping")
    return _reference(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window, softcap)
  implementation = dot_product_backend(q_BLNH.dtype)
  if target_platform() == "gpu" and implementation is None:
    _fallback_warning("dot_product", f"cuDNN flash attention needs bfloat16/float16, got "
                      f"{q_BLNH.dtype}: using jax.nn.dot_product_attention's XLA path")
  mask_B1LS = None
  if segment_ids_BL is not None:
    mask_B1LS = (segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :])
  return jax.nn.dot_product_attention(
      q_BLNH, k_BSKH, v_BSKH, mask=mask_B1LS, scale=1.0, is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation)


# ---------------------------------------------------------------- Pallas splash attention (TPU)


def splash_block(length: int) -> int | None:
  """The kernel's q/kv tile: the largest of 512, 256, 128 dividing `length` (None: none does)."""
  return next((b for b in (512, 256, 128) if length % b == 0), None)


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, length: int, window: Window, softcap: float | None,
                   interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  shape = (length, length)
  if window is None:
    head_mask = sa.CausalMask(shape)
  else:  # causal and `q - k < window`: (window - 1) keys to the left, none to the right
    head_mask = sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  b = splash_block(length)
  blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                         block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return sa.make_splash_mha(sa.MultiHeadMask([head_mask] * num_heads), block_sizes=blocks,
                            head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
                            interpret=interpret)


def _splash_local(q_BLNH, k_BSKH, v_BSKH, seg_BL, *, window: Window, softcap, interpret):
  """The kernel on one device's shard: vmapped over the batch, heads-major layout inside."""
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

  N, L = q_BLNH.shape[2], q_BLNH.shape[1]
  kernel = _splash_kernel(N, L, window, softcap, interpret)
  q_BNLH = jnp.swapaxes(q_BLNH, 1, 2)
  k_BKSH = jnp.swapaxes(k_BSKH, 1, 2)
  v_BKSH = jnp.swapaxes(v_BSKH, 1, 2)
  out_BNLH = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s)))(
      q_BNLH, k_BKSH, v_BKSH, seg_BL)
  return jnp.swapaxes(out_BNLH, 1, 2)


def _splash(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window: Window, *, softcap,
            interpret: bool = False) -> Array:
  B, L, N, H = q_BLNH.shape
  K = k_BSKH.shape[2]
  if not interpret and target_platform() != "tpu":
    _fallback_warning("splash", f"the Pallas splash kernel runs on TPU only (platform "
                      f"{target_platform()!r}; interpret mode is for tests)")
    return _reference(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window, softcap)
  if splash_block(L) is None:
    _fallback_warning("splash", f"sequence length {L} is not a multiple of 128")
    return _reference(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window, softcap)
  seg_BL = (jnp.ones((B, L), jnp.int32) if segment_ids_BL is None
            else segment_ids_BL.astype(jnp.int32))
  local = functools.partial(_splash_local, window=window, softcap=softcap, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q_BLNH, k_BSKH, v_BSKH, seg_BL)
  # A Pallas call is not partitioned by XLA: run it per shard, batch over the data axes and
  # heads over `tensor` (key/value heads repeated up to N when they do not split evenly).
  from jax.sharding import PartitionSpec as P

  batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
  batch_axes = batch_axes if batch_axes and B % int(np.prod([mesh.shape[a] for a in batch_axes
                                                              ])) == 0 else ()
  tensor = mesh.shape["tensor"] if "tensor" in mesh.axis_names else 1
  head_axis = "tensor" if tensor > 1 and N % tensor == 0 else None
  if head_axis and K % tensor:
    k_BSKH = jnp.repeat(k_BSKH, N // K, axis=2)
    v_BSKH = jnp.repeat(v_BSKH, N // K, axis=2)
  b = batch_axes or None
  qkv_spec = P(b, None, head_axis, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(b, None)),
                       out_specs=qkv_spec, check_vma=False)(q_BLNH, k_BSKH, v_BSKH, seg_BL)
