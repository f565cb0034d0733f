"""The Gemma decoder: blocks stacked with `nn.scan` (or unrolled), with a remat policy.

Shape letters: B batch, L length, D d_model, V vocab.

Parameter tree (scanned): `embedder/input_embedding`, `layers/<block>` with a leading `layers` axis,
`final_norm/scale`. Unrolled, the blocks are `layer_{i}/<block>`: the official Gemma tree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from maxgemma.model import kv_cache
from maxgemma.model.attention import Attention
from maxgemma.model.attention_reference import attention_mask
from maxgemma.model.config import REMAT_NAMES, ModelConfig
from maxgemma.model.layers import Embedder, FeedForward, RMSNorm

Array = jax.Array

# The residual stream between the attention and feed-forward matmuls has its own length name, so
# the rules may split it along the sequence (sequence parallelism) while the matmuls see it whole.
RESIDUAL_AXES = ("act_batch", "act_residual_length", "act_embed")
_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
    # The `checkpoint_name` tags of the block: q/k/v after RoPE, the attention context and the
    # attention and feed-forward outputs; the rest (norms, GeGLU hidden) is recomputed.
    "save_names": jax.checkpoint_policies.save_only_these_names(*REMAT_NAMES),
    "offload_names": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(REMAT_NAMES),
        offload_src="device", offload_dst="pinned_host"),
}


class Block(nn.Module):
  """One decoder layer: pre-norm attention and GeGLU, with the optional Gemma 2/3 post-norms."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BLD: Array, positions_BL: Array, mask_BLS: Array | None, layer_xs: dict,
               segment_ids_BL: Array | None = None) -> tuple[Array, kv_cache.Cache | None]:
    """Training: (x, None). Decoding (`layer_xs["cache"]` set, `mask_BLS` None): (x, cache).

    With a kernel `attention_impl` training passes `segment_ids_BL` and no dense mask.
    """
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    cache = layer_xs.get("cache")
    if cache is not None:
      mask_BLS = kv_cache.cache_mask(cache, positions_BL, layer_xs["window"])
    elif mask_BLS is not None:  # (kernel impls: no dense mask, the kernel applies the window)
      # The window is a per-layer value: local layers add `q - k < window` to the shared mask.
      q_idx = jnp.arange(x_BLD.shape[1])
      in_window_LS = (q_idx[:, None] - q_idx[None, :]) < layer_xs["window"]
      mask_BLS = mask_BLS & in_window_LS[None]

    h_BLD = RMSNorm(cfg.norm_eps, param_dtype=pdtype, name="pre_attention_norm")(x_BLD)
    attn = Attention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        d_model=cfg.d_model, query_scale=cfg.query_scale, softcap=cfg.attn_logit_softcap,
        use_qk_norm=cfg.use_qk_norm, norm_eps=cfg.norm_eps, impl=cfg.attention_impl,
        windows=tuple(sorted(set(cfg.layer_windows()))), splash_blocks=cfg.splash_block_sizes(),
        dtype=dtype, param_dtype=pdtype, name="attn",
    )(h_BLD, positions_BL, mask_BLS, layer_xs["rope_base"], layer_xs["rope_scale"], cache=cache,
      segment_ids_BL=segment_ids_BL, window=layer_xs["window"])
    h_BLD, new_cache = attn if cache is not None else (attn, None)
    h_BLD = checkpoint_name(h_BLD, "attn_out")
    if cfg.use_post_attn_norm:
      h_BLD = RMSNorm(cfg.norm_eps, param_dtype=pdtype, name="post_attention_norm")(h_BLD)
    x_BLD = nn.with_logical_constraint(x_BLD + h_BLD, RESIDUAL_AXES)

    h_BLD = RMSNorm(cfg.norm_eps, param_dtype=pdtype, name="pre_ffw_norm")(x_BLD)
    h_BLD = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.transpose_gating_einsum, dtype=dtype,
                        param_dtype=pdtype, flatten=cfg.flatten_matmuls, name="mlp")(h_BLD)
    h_BLD = checkpoint_name(h_BLD, "mlp_out")
    if cfg.use_post_ffw_norm:
      h_BLD = RMSNorm(cfg.norm_eps, param_dtype=pdtype, name="post_ffw_norm")(h_BLD)
    x_BLD = nn.with_logical_constraint(x_BLD + h_BLD, RESIDUAL_AXES)
    return x_BLD, new_cache


def layer_constants(cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Per-layer values the scan feeds each block: window, RoPE base and RoPE scale."""
  types = cfg.layer_types()
  local = np.array([t == "local" for t in types])
  return {
      "window": np.array(cfg.layer_windows(), np.int32),
      "rope_base": np.where(local, cfg.rope_local_base, cfg.rope_global_base).astype(np.float32),
      "rope_scale": np.where(local, cfg.rope_local_scale, cfg.rope_global_scale
                             ).astype(np.float32),
  }


def _names_policy(actions: dict[str, str]):
  """The checkpoint policy that saves, offloads to pinned host memory, or recomputes each tag."""
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=[n for n, a in actions.items() if a == "save"],
      names_which_can_be_offloaded=[n for n, a in actions.items() if a == "offload"],
      offload_src="device", offload_dst="pinned_host")


def _remat(block_cls, cfg: ModelConfig):
  if cfg.remat_policy == "none":
    return block_cls
  policy = _names_policy(cfg.remat_actions()) if cfg.remat_policy == "names" \
      else _REMAT_POLICIES[cfg.remat_policy]
  return nn.remat(block_cls, policy=policy, prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
  """Gemma decoder: tokens [B, L] (with optional positions and segment ids) -> logits [B, L, V]."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embedder = Embedder(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                             flatten=cfg.flatten_matmuls)
    block = _remat(Block, cfg)
    if cfg.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="layers")
    else:
      self.blocks = [block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.norm_eps, param_dtype=pdtype)

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, *, return_hidden: bool = False) -> Array:
    """Logits [B, L, V] in float32, or the final normed hidden states [B, L, D] if asked.

    `segment_ids` mark packed documents (attention never crosses them; 0 marks padding) and
    `positions` restart at 0 in each document. Both default to one document per row.
    """
    cfg = self.config
    tokens_BL, positions_BL, segment_ids_BL = check_inputs(tokens, positions, segment_ids)
    idx_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    # Causal by index (the packed layout keeps each document contiguous), within one segment.
    # The kernel impls build no dense mask: they take the segment ids (and each layer's window).
    kernel = cfg.attention_impl != "xla"
    mask_BLS = None if kernel else attention_mask(idx_BL, idx_BL, segment_ids_BL, segment_ids_BL)
    seg_BL = segment_ids_BL if kernel else None

    x_BLD = self.embedder.encode(tokens_BL)
    x_BLD = nn.with_logical_constraint(x_BLD, RESIDUAL_AXES)
    consts = layer_constants(cfg)
    if cfg.scan_layers:
      x_BLD, _ = self.layers(x_BLD, positions_BL, mask_BLS, consts, seg_BL)
    else:
      for i, blk in enumerate(self.blocks):
        x_BLD, _ = blk(x_BLD, positions_BL, mask_BLS, {k: v[i] for k, v in consts.items()},
                       seg_BL)
    x_BLD = self.final_norm(x_BLD)
    if return_hidden:
      return x_BLD
    return self.logits(x_BLD)

  def decode(self, tokens_BL: Array, positions_BL: Array, cache: dict) -> tuple[Array, dict]:
    """Cached decoding: logits [B, L, V] of L new tokens and the updated cache.

    `cache` comes from `kv_cache.init_cache` (one entry per layer, or stacked under `layers` for
    the scanned model). A prefill passes the whole prompt, each later step one token per row.
    `positions_BL` are each token's position in its row; -1 marks padding (never attended to).
    """
    cfg = self.config
    x_BLD = self.embedder.encode(tokens_BL)
    consts = layer_constants(cfg)
    if cfg.scan_layers:
      x_BLD, new_layers = self.layers(x_BLD, positions_BL, None,
                                      {**consts, "cache": cache["layers"]}, None)
      new_cache = {"layers": new_layers}
    else:
      new_cache = {}
      for i, blk in enumerate(self.blocks):
        xs = {**{k: v[i] for k, v in consts.items()}, "cache": cache[f"layer_{i}"]}
        x_BLD, new_cache[f"layer_{i}"] = blk(x_BLD, positions_BL, None, xs)
    return self.logits(self.final_norm(x_BLD)), new_cache

  def logits(self, x_BLD: Array) -> Array:
    """Tied output projection with the optional final soft-cap, float32 [B, L, V]."""
    logits_BLV = self.embedder.attend(x_BLD)
    cap = self.config.final_logit_softcap
    if cap is not None:
      logits_BLV = jnp.tanh(logits_BLV / cap) * cap
    return nn.with_logical_constraint(logits_BLV, ("act_batch", "act_length", "act_vocab"))


def check_inputs(tokens, positions, segment_ids) -> tuple[Array, Array, Array]:
  """Validates shapes and dtypes, filling the defaults; raises one clear ValueError."""
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length] integers, got shape {tuple(tokens.shape)}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
  B, L = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  if segment_ids is None:
    segment_ids = jnp.ones((B, L), jnp.int32)
  for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
    if tuple(arr.shape) != (B, L):
      raise ValueError(f"{name} must have the shape of tokens {(B, L)}, got {tuple(arr.shape)}")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
      raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
  return tokens, positions, segment_ids
