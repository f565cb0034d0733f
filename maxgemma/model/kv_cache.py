"""Key/value caches for incremental decoding.

Shape letters: B batch, L new tokens, C cache slots, K key/value heads, H head dim.

A layer's cache is `{"k": [B, C, K, H], "v": [B, C, K, H], "pos": [B, C] int32, "index": []
int32}`: the keys and values of the tokens seen so far, the position of each slot (-1: empty or
padding, never attended to) and how many tokens were written. Slots are used as a ring: token
number t goes to slot t % C, so a local (sliding-window) layer only needs C = window slots while a
global layer needs C = the longest sequence. New tokens attend to the old slots and to each other
(`concat`), and only then are written: a chunk longer than the window (a long prompt) is handled
in one call. Masks come from the stored positions, so slot order never matters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maxgemma.model.config import ModelConfig

Array = jax.Array
Cache = dict[str, Array]


def layer_cache_sizes(cfg: ModelConfig, max_len: int, ring: bool) -> list[int]:
  """Slots per layer: the window for local layers when `ring`, else `max_len` for every layer."""
  return [min(w, max_len) if (ring and w is not None) else max_len for w in cfg.layer_windows()]


def init_layer_cache(batch: int, size: int, num_kv_heads: int, head_dim: int, dtype) -> Cache:
  return {"k": jnp.zeros((batch, size, num_kv_heads, head_dim), dtype),
          "v": jnp.zeros((batch, size, num_kv_heads, head_dim), dtype),
          "pos": jnp.full((batch, size), -1, jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, *, ring: bool | None = None) -> dict:
  """An empty cache for `Transformer.decode` holding up to `max_len` tokens per row.

  Unrolled models (`scan_layers=False`) get ring buffers of `sliding_window` slots for local
  layers (ring=True, the default); scanned models need one slot count for every layer, so each
  layer holds `max_len` slots and local layers mask to their window (ring must be False).
  """
  dtype = jnp.dtype(cfg.dtype)
  if cfg.scan_layers:
    if ring:
      raise ValueError("ring-buffer caches need the unrolled model (scan_layers=False): the "
                       "scanned layers share one cache shape")
    one = init_layer_cache(batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)
    return {"layers": jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.num_layers, *x.shape)),
                                   one)}
  sizes = layer_cache_sizes(cfg, max_len, ring=ring is None or ring)
  return {f"layer_{i}": init_layer_cache(batch, c, cfg.num_kv_heads, cfg.head_dim, dtype)
          for i, c in enumerate(sizes)}


def cache_axes(cache: dict) -> dict:
  """The logical axes of every leaf of a cache from `init_cache` (tuples of names, None free)."""
  def layer(lead: tuple) -> dict:
    return {"k": (*lead, "act_batch", None, "act_kv_heads", None),
            "v": (*lead, "act_batch", None, "act_kv_heads", None),
            "pos": (*lead, "act_batch", None), "index": lead}
  if "layers" in cache:
    return {"layers": layer(("layers",))}
  return {name: layer(()) for name in cache}


def cache_mask(cache: Cache, positions_BL: Array, window: Array | int) -> Array:
  """[B, L, C + L] bool: which of (old slots, new tokens) each new token attends to."""
  k_pos_BS = jnp.concatenate([cache["pos"], positions_BL.astype(jnp.int32)], axis=1)
  delta_BLS = positions_BL[:, :, None] - k_pos_BS[:, None, :]
  return (k_pos_BS[:, None, :] >= 0) & (delta_BLS >= 0) & (delta_BLS < window)


def extend(cache: Cache, k_BLKH: Array, v_BLKH: Array) -> tuple[Array, Array]:
  """Keys and values to attend over: the cached slots followed by the new tokens."""
  dtype = cache["k"].dtype
  return (jnp.concatenate([cache["k"], k_BLKH.astype(dtype)], axis=1),
          jnp.concatenate([cache["v"], v_BLKH.astype(dtype)], axis=1))


def write(cache: Cache, k_BLKH: Array, v_BLKH: Array, positions_BL: Array) -> Cache:
  """The cache with the new tokens written at slots (index + j) % C (the last C if L > C)."""
  C, L = cache["k"].shape[1], k_BLKH.shape[1]
  n = min(L, C)
  slots = (cache["index"] + (L - n) + jnp.arange(n, dtype=jnp.int32)) % C
  dtype = cache["k"].dtype
  return {"k": cache["k"].at[:, slots].set(k_BLKH[:, L - n:].astype(dtype)),
          "v": cache["v"].at[:, slots].set(v_BLKH[:, L - n:].astype(dtype)),
          "pos": cache["pos"].at[:, slots].set(positions_BL[:, L - n:].astype(jnp.int32)),
          "index": cache["index"] + L}


def cache_bytes(cache: dict) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache)))
