"""Fused attention implementations behind `attention.dot_product_attention`'s `impl` switch.

- "dot_product": `jax.nn.dot_product_attention`. On a GPU with bfloat16/float16 inputs it asks for
  `implementation="cudnn"` (the cuDNN flash kernel: causal mask and the left sliding window are
  native, segment ids go in as the boolean `mask`, which cuDNN turns into a [B, 1, L, S] bias);
  elsewhere `implementation=None`, JAX's XLA path. It has no logit soft-capping.
- "splash": the Pallas splash-attention kernel for TPU (`make_splash_mha`: `CausalMask` or a
  causal `LocalMask`, `SegmentIds`, `attn_logits_soft_cap`), in a `shard_map` over the batch and
  head axes of the mesh in scope. Off a TPU it runs only in Pallas interpret mode (tests).
- "ring": ring attention for sequence parallelism, in XLA (einsums per block: CPU, GPU and TPU).
  In a `shard_map` over the activations' batch, length and heads axes each shard keeps its
  queries and its key/value chunk; for as many steps as there are length shards it attends its
  queries to the chunk it holds (online softmax: running max and sum, float32 accumulator) and
  passes the chunk and its segment ids on to the next shard (`lax.ppermute`). Keys and values
  are never gathered; the scores live one [L/P, L/P] block per head at a time. The backward
  pass (a custom VJP) rings the chunks round again with their dk/dv accumulators, from the
  forward's log-sum-exp: nothing per step is kept. Without a split
  length (no `sequence` axis, or size 1) there is nothing to ring over: it falls back. Splash
  keeps the all-gather form below.

All take what the kernels need instead of a dense mask: segment ids and the layer's window (an
int, `attention_reference.GLOBAL_WINDOW` for a global layer). Under the scanned layers the window
is a traced per-layer value, while a kernel needs it static: `lax.switch` picks, at run time,
between one branch per distinct window of the model (each branch static; only the selected one
runs). Unrolled layers pass a static window and need no switch. Whatever a kernel cannot do falls
back to the reference (`attention_reference.self_attention`) with the reason logged once.

The splash `shard_map` specs come from the logical axes of the activations (`act_batch`,
`act_length`, `act_heads`) under the logical-axis rules in scope, so this module names no mesh
axis. When the rules split `act_length` (sequence parallelism), each shard keeps its queries and
gets the whole length of keys, values and key segment ids (all-gathered by the partitioner at the
`shard_map` boundary); the kernel is built for the whole [L, L] mask with `q_seq_shards` and its
mask tables are passed in split along the query blocks, so each shard computes only its rows.
Splash keeps this all-gather form; "ring" is the variant that never gathers (see `_ring`).

Shape letters: B batch, L query length, S key length, N query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from maxgemma.model.attention_reference import (
  attention_mask,
  is_global,
  masked_logits,
  self_attention,
  static_window,
)

Array = jax.Array
log = logging.getLogger(__name__)
KERNEL_IMPLS = ("dot_product", "splash", "ring")
_logged: set[tuple[str, str]] = set()


def _fallback_warning(impl: str, reason: str) -> None:
  if (impl, reason) not in _logged:
    _logged.add((impl, reason))
    log.warning("attention_impl %r falls back to 'xla': %s", impl, reason)


def attend(q_BLNH: Array, k_BSKH: Array, v_BSKH: Array, *, impl: str,
           segment_ids_BL: Array | None, window: Array | int, windows: Sequence[int] = (),
           softcap: float | None = None, interpret: bool = False,
           splash_blocks: tuple[int | bool, ...] = ()) -> Array:
  """Causal self-attention (q pre-scaled) within segments and the layer's `window`: [B, L, N, H].

  `window` is the layer's window: an int (GLOBAL_WINDOW for global) or a traced scalar taking
  one of the values of `windows`, the model's distinct windows. `splash_blocks`: the splash tiles
  (`ModelConfig.splash_block_sizes()`; empty or 0: `splash_block`).
  """
  if impl not in KERNEL_IMPLS:
    raise ValueError(f"unknown kernel attention_impl {impl!r}; known: {', '.join(KERNEL_IMPLS)}")
  kernel = {"dot_product": _dot_product, "splash": _splash, "ring": _ring}[impl]
  extra = {"blocks": tuple(splash_blocks)} if impl == "splash" else {}
  fn = functools.partial(kernel, softcap=softcap, interpret=interpret, **extra)
  w = static_window(window)
  if w is not None:
    return fn(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, w)
  distinct = sorted({static_window(x) for x in windows})
  if not distinct:
    raise ValueError("a traced attention window needs `windows`, the model's distinct windows")
  if len(distinct) == 1:
    return fn(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, distinct[0])
  # One static branch per distinct window; the traced window selects the branch at run time.
  index = jnp.argmax(jnp.asarray(window) == jnp.asarray(distinct, jnp.int32))
  branches = [functools.partial(lambda q, k, v, s, w: fn(q, k, v, s, w), w=x) for x in distinct]
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


def _dot_product(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window: int, *, softcap,
                 interpret: bool = False) -> Array:
  del interpret
  if softcap is not None:
    _fallback_warning("dot_product", "jax.nn.dot_product_attention has no logit soft-capping")
    return self_attention(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window, softcap)
  implementation = dot_product_backend(q_BLNH.dtype)
  if target_platform() == "gpu" and implementation is None:
    _fallback_warning("dot_product", f"cuDNN flash attention needs bfloat16/float16, got "
                      f"{q_BLNH.dtype}: using jax.nn.dot_product_attention's XLA path")
  mask_B1LS = None
  if segment_ids_BL is not None:
    mask_B1LS = (segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :])
  return jax.nn.dot_product_attention(
      q_BLNH, k_BSKH, v_BSKH, mask=mask_B1LS, scale=1.0, is_causal=True,
      local_window_size=None if is_global(window) else (window - 1, 0),
      implementation=implementation)


# ---------------------------------------------------------------- Pallas splash attention (TPU)


def splash_block(length: int) -> int | None:
  """The kernel's q/kv tile: the largest of 512, 256, 128 dividing `length` (None: none does)."""
  return next((b for b in (512, 256, 128) if length % b == 0), None)


_BLOCK_NAMES = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")


_Q_BLOCKS = ("block_q", "block_q_dkv", "block_q_dq")  # tiles of the query length


def splash_block_sizes(length: int, blocks: Sequence[int | bool] = (), q_shards: int = 1
                       ) -> dict[str, int | bool]:
  """`BlockSizes` fields for `length` from `blocks` (the 8 tiles then the fused-backward flag):
  a tile 0 (or missing) is `splash_block` of the length it tiles, a compute tile 0 its block;
  with the fused backward the dq tiles are None. The query tiles tile one shard's queries,
  `length / q_shards` (sequence parallelism), the key tiles the whole length. Raises ValueError
  naming the model key of a tile that does not divide its length."""
  blocks = tuple(blocks) + (0,) * (len(_BLOCK_NAMES) + 1 - len(blocks))
  fused = bool(blocks[-1])
  q_length = length // q_shards
  sizes: dict[str, int | bool | None] = {}
  for name, value in zip(_BLOCK_NAMES, blocks[:-1], strict=True):
    tiled = q_length if name in _Q_BLOCKS else length
    if value and tiled % value:
      where = (f"the sequence length {length}" if tiled == length else
               f"one sequence shard's {tiled} queries (train.seq_len {length} / {q_shards}, "
               f"mesh.ici_sequence x mesh.dcn_sequence)")
      raise ValueError(f"model.splash_{name}={value} does not divide {where}; use a divisor "
                       f"of it or 0 (default)")
    default = splash_block(tiled)
    if not value and default is None:
      raise ValueError(f"no splash tile of 512, 256 or 128 divides one sequence shard's {tiled} "
                       f"queries (train.seq_len {length} / {q_shards}, mesh.ici_sequence x "
                       f"mesh.dcn_sequence); use a train.seq_len that is a multiple of "
                       f"{128 * q_shards}")
    sizes[name] = int(value) or default
  for compute, block in (("block_kv_compute", "block_kv"),
                         ("block_kv_dkv_compute", "block_kv_dkv")):
    sizes[compute] = int(blocks[_BLOCK_NAMES.index(compute)]) or sizes[block]
    if sizes[block] % sizes[compute]:
      raise ValueError(f"model.splash_{compute}={sizes[compute]} does not divide the "
                       f"splash_{block} tile {sizes[block]}; use a divisor of it")
  if fused:
    sizes["block_q_dq"] = sizes["block_kv_dq"] = None
  sizes["use_fused_bwd_kernel"] = fused
  return sizes


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, length: int, window: int, softcap: float | None,
                   interpret: bool, blocks: tuple[int | bool, ...] = (), q_shards: int = 1):
  """The cached splash kernel for an [L, L] mask whose queries are split in `q_shards` (1: one
  shard holds them all); its mask arrays are built concrete (never tracers of the trace
  that first asked for it), so a later trace may reuse it. It is built on a fresh thread: no
  trace and no mesh in context there, so the arrays land on the host's default device even
  while an AOT compile for a TPU topology (whose devices cannot run anything) is being traced."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  shape = (length, length)
  if is_global(window):
    head_mask = sa.CausalMask(shape)
  else:  # causal and `q - k < window`: (window - 1) keys to the left, none to the right
    head_mask = sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  block_sizes = sa.BlockSizes(**splash_block_sizes(length, blocks, q_shards))
  make = functools.partial(sa.make_splash_mha, sa.MultiHeadMask([head_mask] * num_heads),
                           block_sizes=block_sizes, head_shards=1, q_seq_shards=q_shards,
                           attn_logits_soft_cap=softcap, interpret=interpret)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(make).result()


def _splash_local(q_BLNH, k_BSKH, v_BSKH, seg_BL, seg_BS=None, kernel=None, *, window: int,
                  softcap, interpret, blocks=()):
  """The kernel on one device's shard: vmapped over the batch, heads-major layout inside.

  `kernel` None: built here for this shard's heads and length (queries and keys alike); else the
  sequence-parallel kernel's shard, with the queries' segment ids `seg_BL` and the keys' `seg_BS`.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

  N, L = q_BLNH.shape[2], q_BLNH.shape[1]
  if kernel is None:
    kernel = _splash_kernel(N, L, window, softcap, interpret, blocks)
    seg_BS = seg_BL
  q_BNLH = jnp.swapaxes(q_BLNH, 1, 2)
  k_BKSH = jnp.swapaxes(k_BSKH, 1, 2)
  v_BKSH = jnp.swapaxes(v_BSKH, 1, 2)
  out_BNLH = jax.vmap(lambda q, k, v, sq, sk: kernel(q, k, v, segment_ids=SegmentIds(sq, sk)))(
      q_BNLH, k_BKSH, v_BKSH, seg_BL, seg_BS)
  return jnp.swapaxes(out_BNLH, 1, 2)


def _splash(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window: int, *, softcap,
            interpret: bool = False, blocks: tuple[int | bool, ...] = ()) -> Array:
  B, L, N, H = q_BLNH.shape
  if not interpret and target_platform() != "tpu":
    _fallback_warning("splash", f"the Pallas splash kernel runs on TPU only (platform "
                      f"{target_platform()!r}; interpret mode is for tests)")
    return self_attention(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window, softcap)
  if splash_block(L) is None:
    _fallback_warning("splash", f"sequence length {L} is not a multiple of 128")
    return self_attention(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window, softcap)
  seg_BL = _segment_ids(segment_ids_BL, B, L)
  local = functools.partial(_splash_local, window=window, softcap=softcap, interpret=interpret,
                            blocks=blocks)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q_BLNH, k_BSKH, v_BSKH, seg_BL)
  # A Pallas call is not partitioned by XLA: run it per shard, over the mesh axes the rules in
  # scope give the activations' batch, length and heads (key/value heads repeated up to N when
  # they do not split over the heads' axes).
  q_spec = shard_spec(("act_batch", "act_length", "act_heads", None), q_BLNH.shape, mesh)
  batch, length, heads = q_spec[0], q_spec[1], q_spec[2]
  kv_spec = PartitionSpec(batch, None, heads, None)  # keys and values: the whole length
  k_BSKH, v_BSKH = _kv_for_split_heads(k_BSKH, v_BSKH, N, heads, mesh)
  seg_spec = PartitionSpec(batch, None)
  if length is None:
    return jax.shard_map(local, mesh=mesh, in_specs=(kv_spec, kv_spec, kv_spec, seg_spec),
                         out_specs=kv_spec, check_vma=False)(q_BLNH, k_BSKH, v_BSKH, seg_BL)
  # Sequence parallelism: each shard's queries against all keys. The kernel covers the whole
  # [L, L] mask for this shard's heads; its mask tables are split along the query blocks.
  shards = _axes_size(length, mesh)
  heads_here = N // (_axes_size(heads, mesh) if heads is not None else 1)
  kernel = _splash_kernel(heads_here, L, window, softcap, interpret, blocks, shards)
  kernel_spec = kernel.manual_sharding_spec(
      jax.sharding.NamedSharding(mesh, PartitionSpec(None, length)))
  return jax.shard_map(
      local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(batch, length),
                                  seg_spec, kernel_spec),
      out_specs=q_spec, check_vma=False)(q_BLNH, k_BSKH, v_BSKH, seg_BL, seg_BL, kernel)


# ---------------------------------------------------------------- ring attention (XLA)


def _ring(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window: int, *, softcap,
          interpret: bool = False) -> Array:
  """Ring attention over the mesh axes the rules in scope give `act_length`.

  Each shard holds L/P queries and the L/P keys/values (and key segment ids) of the same
  positions; in P steps every key/value chunk visits every shard (`_ring_local`). Batch and heads
  stay split as the rules say (key/value heads repeated up to N when they do not split over the
  heads' axes). Falls back to the reference when the rules do not split the length.
  """
  del interpret
  B, L, N, H = q_BLNH.shape
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:  # no mesh in scope (shape-only traces such as the parameter init): nothing split
    return self_attention(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window, softcap)
  q_spec = shard_spec(("act_batch", "act_length", "act_heads", None), q_BLNH.shape, mesh)
  if q_spec[1] is None:
    _fallback_warning("ring", f"the logical-axis rules in scope split no length {L} over the mesh "
                      f"(no sequence axis > 1, or one that does not divide {L}): "
                      f"nothing to ring over")
    return self_attention(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window, softcap)
  batch, length, heads = q_spec[0], q_spec[1], q_spec[2]
  k_BSKH, v_BSKH = _kv_for_split_heads(k_BSKH, v_BSKH, N, heads, mesh)
  seg_BL = _segment_ids(segment_ids_BL, B, L)
  kv_spec = PartitionSpec(batch, length, heads, None)  # keys and values: this shard's chunk
  seg_spec = PartitionSpec(batch, length)
  local = functools.partial(_ring_local, axes=length, shards=_axes_size(length, mesh),
                            window=window, softcap=softcap)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(q_BLNH, k_BSKH, v_BSKH, seg_BL)


def _ring_local(q_BLNH, k_BSKH, v_BSKH, seg_BL, *, axes, shards: int, window: int, softcap
                ) -> Array:
  """One shard's ring: its L queries (L = the whole length / `shards`) against each of the
  `shards` key/value chunks in turn, the chunk passed on to the next shard along `axes` after
  each step. Positions are global: this shard's index along `axes` times L, plus the offset.
  The backward pass rings again (`_ring_bwd`): it keeps only the inputs, the output and each
  query's log-sum-exp, never a step's chunk."""
  return _ring_vjp(q_BLNH, k_BSKH, v_BSKH, seg_BL, axes, shards, window, softcap)


def _ring_geometry(B: int, L: int, axes, shards: int, window: int):
  """What the forward and backward rings share: this shard's index `me` along `axes`;
  `needed(chunk)`, whether any of its L queries sees a key of key/value chunk `chunk` (not all
  after the queries, not all out of the window); `mask(k_seg_BS, seg_BL, chunk)`, the [B, L, L]
  mask of its queries against that chunk on global positions; and `perm`, the ring's
  permutation (step t: shard i holds chunk i - t)."""
  me = jax.lax.axis_index(axes)
  q_pos_BL = jnp.broadcast_to(me * L + jnp.arange(L), (B, L))

  def needed(chunk):
    return (chunk <= me) & ((me - chunk) * L - (L - 1) < window)

  def mask(k_seg_BS, seg_BL, chunk):
    k_pos_BS = jnp.broadcast_to(chunk * L + jnp.arange(L), (B, L))
    return attention_mask(q_pos_BL, k_pos_BS, seg_BL, k_seg_BS, window)

  return me, needed, mask, [(i, (i + 1) % shards) for i in range(shards)]


def _ring_fwd(q_BLNH, k_BSKH, v_BSKH, seg_BL, axes, shards: int, window: int, softcap):
  """The ring's output [B, L, N, H] and each query's log-sum-exp [B, K, G, L] (float32)."""
  B, L, N, H = q_BLNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  q_BLKGH = q_BLNH.reshape(B, L, K, G, H)
  me, needed, mask, perm = _ring_geometry(B, L, axes, shards, window)

  def block(carry, k_BSKH, v_BSKH, k_seg_BS, chunk):
    """The online-softmax update of the running max, sum and output with one key chunk."""
    m_BKGL, l_BKGL, acc_BKGLH = carry
    mask_BLS = mask(k_seg_BS, seg_BL, chunk)
    logits_BKGLS = masked_logits(q_BLKGH, k_BSKH, mask_BLS, softcap)
    mask_B11LS = mask_BLS[:, None, None]
    m_new_BKGL = jnp.maximum(m_BKGL, logits_BKGLS.max(-1))
    # Masked keys weigh 0 exactly, also in a row with no key in this block (m_new = finfo.min).
    p_BKGLS = jnp.where(mask_B11LS, jnp.exp(logits_BKGLS - m_new_BKGL[..., None]), 0.0)
    scale_BKGL = jnp.exp(m_BKGL - m_new_BKGL)
    l_BKGL = l_BKGL * scale_BKGL + p_BKGLS.sum(-1)
    pv_BKGLH = jnp.einsum("BKGLS,BSKH->BKGLH", p_BKGLS.astype(v_BSKH.dtype), v_BSKH,
                          preferred_element_type=jnp.float32)
    acc_BKGLH = acc_BKGLH * scale_BKGL[..., None] + pv_BKGLH
    return m_new_BKGL, l_BKGL, acc_BKGLH

  def step(carry, k_BSKH, v_BSKH, k_seg_BS, t):
    chunk = (me - t) % shards
    return jax.lax.cond(needed(chunk), block, lambda c, *_: c, carry, k_BSKH, v_BSKH, k_seg_BS,
                        chunk)

  def ring_step(state, t):
    carry, k_BSKH, v_BSKH, k_seg_BS = state
    carry = step(carry, k_BSKH, v_BSKH, k_seg_BS, t)
    k_BSKH, v_BSKH, k_seg_BS = (jax.lax.ppermute(x, axes, perm)
                                for x in (k_BSKH, v_BSKH, k_seg_BS))
    return (carry, k_BSKH, v_BSKH, k_seg_BS), None

  carry = (jnp.full((B, K, G, L), jnp.finfo(jnp.float32).min, jnp.float32),
           jnp.zeros((B, K, G, L), jnp.float32), jnp.zeros((B, K, G, L, H), jnp.float32))
  (carry, k_BSKH, v_BSKH, seg_BS), _ = jax.lax.scan(
      ring_step, (carry, k_BSKH, v_BSKH, seg_BL), jnp.arange(shards - 1))
  m_BKGL, l_BKGL, acc_BKGLH = step(carry, k_BSKH, v_BSKH, seg_BS, shards - 1)  # the last chunk
  # Every query attends at least itself (causal, same segment, window >= 1): l > 0.
  l_BKGL = jnp.where(l_BKGL > 0, l_BKGL, 1.0)
  out_BKGLH = acc_BKGLH / l_BKGL[..., None]
  out_BLNH = jnp.einsum("BKGLH->BLKGH", out_BKGLH).reshape(B, L, N, H).astype(q_BLNH.dtype)
  return out_BLNH, m_BKGL + jnp.log(l_BKGL)


def _ring_bwd(axes, shards: int, window: int, softcap, residuals, dout_BLNH):
  """Gradients of the ring: the key/value chunks go round again, each with its dk and dv
  accumulators, and after `shards` steps every chunk and its gradients are back home."""
  q_BLNH, k_BSKH, v_BSKH, seg_BL, out_BLNH, lse_BKGL = residuals
  B, L, N, H = q_BLNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  f32 = jnp.float32
  q_BLKGH = q_BLNH.reshape(B, L, K, G, H)
  do_BLKGH = dout_BLNH.reshape(B, L, K, G, H).astype(f32)
  # D = rowsum(dO * O): the softmax backward's correction term, per query.
  d_BKGL = jnp.einsum("BLKGH,BLKGH->BKGL", do_BLKGH, out_BLNH.reshape(B, L, K, G, H).astype(f32))
  me, needed, mask, perm = _ring_geometry(B, L, axes, shards, window)

  def block(grads, k_BSKH, v_BSKH, k_seg_BS, chunk):
    dq_BLKGH, dk_BSKH, dv_BSKH = grads
    mask_BLS = mask(k_seg_BS, seg_BL, chunk)
    logits_BKGLS = masked_logits(q_BLKGH, k_BSKH, mask_BLS, softcap)
    p_BKGLS = jnp.where(mask_BLS[:, None, None], jnp.exp(logits_BKGLS - lse_BKGL[..., None]),
                        0.0)
    dv_BSKH = dv_BSKH + jnp.einsum("BKGLS,BLKGH->BSKH", p_BKGLS, do_BLKGH)
    dp_BKGLS = jnp.einsum("BLKGH,BSKH->BKGLS", do_BLKGH, v_BSKH, preferred_element_type=f32)
    ds_BKGLS = p_BKGLS * (dp_BKGLS - d_BKGL[..., None])  # wrt the (soft-capped) logits
    if softcap is not None:  # logits = c tanh(s / c): d logits / d s = 1 - (logits / c)^2
      # (masked keys carry finfo.min, whose square overflows: their factor is 0, as their p)
      ds_BKGLS = ds_BKGLS * jnp.where(mask_BLS[:, None, None],
                                      1.0 - jnp.square(logits_BKGLS / softcap), 0.0)
    dq_BLKGH = dq_BLKGH + jnp.einsum("BKGLS,BSKH->BLKGH", ds_BKGLS, k_BSKH,
                                     preferred_element_type=f32)
    dk_BSKH = dk_BSKH + jnp.einsum("BKGLS,BLKGH->BSKH", ds_BKGLS, q_BLKGH,
                                   preferred_element_type=f32)
    return dq_BLKGH, dk_BSKH, dv_BSKH

  def ring_step(state, t):
    dq_BLKGH, k_BSKH, v_BSKH, k_seg_BS, dk_BSKH, dv_BSKH = state
    chunk = (me - t) % shards
    dq_BLKGH, dk_BSKH, dv_BSKH = jax.lax.cond(
        needed(chunk), block, lambda g, *_: g, (dq_BLKGH, dk_BSKH, dv_BSKH), k_BSKH, v_BSKH,
        k_seg_BS, chunk)
    k_BSKH, v_BSKH, k_seg_BS, dk_BSKH, dv_BSKH = (
        jax.lax.ppermute(x, axes, perm) for x in (k_BSKH, v_BSKH, k_seg_BS, dk_BSKH, dv_BSKH))
    return (dq_BLKGH, k_BSKH, v_BSKH, k_seg_BS, dk_BSKH, dv_BSKH), None

  zeros_kv = jnp.zeros(k_BSKH.shape, f32)
  state = (jnp.zeros((B, L, K, G, H), f32), k_BSKH, v_BSKH, seg_BL, zeros_kv, zeros_kv)
  (dq_BLKGH, _, _, _, dk_BSKH, dv_BSKH), _ = jax.lax.scan(ring_step, state, jnp.arange(shards))
  return (dq_BLKGH.reshape(B, L, N, H).astype(q_BLNH.dtype), dk_BSKH.astype(k_BSKH.dtype),
          dv_BSKH.astype(v_BSKH.dtype), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _ring_vjp(q_BLNH, k_BSKH, v_BSKH, seg_BL, axes, shards, window, softcap):
  return _ring_fwd(q_BLNH, k_BSKH, v_BSKH, seg_BL, axes, shards, window, softcap)[0]


def _ring_vjp_fwd(q_BLNH, k_BSKH, v_BSKH, seg_BL, axes, shards, window, softcap):
  out_BLNH, lse_BKGL = _ring_fwd(q_BLNH, k_BSKH, v_BSKH, seg_BL, axes, shards, window, softcap)
  return out_BLNH, (q_BLNH, k_BSKH, v_BSKH, seg_BL, out_BLNH, lse_BKGL)


_ring_vjp.defvjp(_ring_vjp_fwd, _ring_bwd)


def _segment_ids(segment_ids_BL: Array | None, B: int, L: int) -> Array:
  """The kernels' int32 segment ids: one segment per row when there are none."""
  return (jnp.ones((B, L), jnp.int32) if segment_ids_BL is None
          else segment_ids_BL.astype(jnp.int32))


def _kv_for_split_heads(k_BSKH: Array, v_BSKH: Array, N: int, heads, mesh) -> tuple[Array, Array]:
  """Keys and values for a `shard_map` that splits the query heads over the mesh axes `heads`:
  repeated up to the N query heads when the K key/value heads do not split over them."""
  K = k_BSKH.shape[2]
  if heads is not None and K % _axes_size(heads, mesh):
    return jnp.repeat(k_BSKH, N // K, axis=2), jnp.repeat(v_BSKH, N // K, axis=2)
  return k_BSKH, v_BSKH


def _axes_size(axes: str | tuple[str, ...], mesh) -> int:
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def shard_spec(logical: Sequence[str | None], shape: Sequence[int], mesh) -> PartitionSpec:
  """The PartitionSpec the logical-axis rules in scope give an array of `shape` on `mesh`.

  Mesh axes of size 1 are dropped, and a dimension whose size the remaining axes do not divide
  stays replicated.
  """
  out = []
  for axes, dim in zip(nn.logical_to_mesh_axes(logical), shape, strict=True):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    if axes and dim % _axes_size(axes, mesh) == 0:
      out.append(axes[0] if len(axes) == 1 else axes)
    else:
      out.append(None)
  return PartitionSpec(*out)
