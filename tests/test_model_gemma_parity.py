"""maxgemma's logits equal the official `gemma` library's (its Flax model) on the same weights.

The official library consumes the official parameter tree directly, so this also checks that our
unrolled tree is the native Gemma tree, name for name and shape for shape.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxgemma.model.config import ModelConfig
from maxgemma.model.presets import get_preset
from tests.gemma_lib import import_gemma
from tests.model_utils import random_params, rel_err, run_maxgemma

TOLERANCE = 1e-5  # max |ours - theirs| / max |theirs|, float32


def official_config(gm, cfg: ModelConfig):
  modules = gm.nn._modules
  kind = {"global": modules.AttentionType.GLOBAL, "local": modules.AttentionType.LOCAL_SLIDING}
  norm = gm.nn.config.QueryPreAttentionNormalisation
  if cfg.query_pre_attn_scalar in (None, cfg.head_dim):
    query_norm = norm.BY_ONE_OVER_SQRT_HEAD_DIM
  else:
    assert cfg.query_pre_attn_scalar == cfg.d_model // cfg.num_heads
    query_norm = norm.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
  return gm.nn.config.TransformerConfig(
      num_embed=cfg.vocab_size, embed_dim=cfg.d_model, hidden_dim=cfg.ffn_dim,
      num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
      final_logit_softcap=cfg.final_logit_softcap, use_post_attn_norm=cfg.use_post_attn_norm,
      use_post_ffw_norm=cfg.use_post_ffw_norm,
      attention_types=tuple(kind[t] for t in cfg.layer_types()), query_pre_attn_norm=query_norm,
      attn_logits_soft_cap=cfg.attn_logit_softcap, sliding_window_size=cfg.sliding_window,
      transpose_gating_einsum=cfg.transpose_gating_einsum, use_qk_norm=cfg.use_qk_norm,
      local_base_frequency=int(cfg.rope_local_base),
      global_base_frequency=int(cfg.rope_global_base),
      local_scale_factor=cfg.rope_local_scale, global_scale_factor=cfg.rope_global_scale)


@pytest.mark.parametrize("preset", ["tiny_gemma1_mqa", "tiny_gemma1_mha", "tiny_gemma2",
                                    "tiny_gemma3"])
def test_logits_match_official_gemma(preset):
  gm = import_gemma()
  cfg = get_preset(preset, dtype="float32", scan_layers=False)
  params = random_params(cfg, seed=3)
  B, L = 2, 20  # longer than the sliding window (8)
  tokens = np.random.default_rng(4).integers(4, cfg.vocab_size, (B, L))
  positions = np.broadcast_to(np.arange(L), (B, L))
  causal = np.broadcast_to(np.tril(np.ones((L, L), bool)), (B, L, L))

  model = gm.nn.Transformer(config=official_config(gm, cfg), dtype=jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(tokens))["params"]
  # Same names and shapes as the official tree: the weights load into the library unchanged.
  ours_shapes = jax.tree.map(np.shape, params)
  assert jax.tree.map(lambda s: s.shape, shapes) == ours_shapes
  out = model.apply({"params": params}, jnp.asarray(tokens), positions=jnp.asarray(positions),
                    attention_mask=jnp.asarray(causal))
  theirs = np.asarray(out.logits)
  for scan in (False, True):
    ours = run_maxgemma(cfg.replace(scan_layers=scan), params, tokens)
    err = rel_err(ours, theirs)
    print(f"{preset} scan={scan}: max relative difference {err:.2e}")
    assert err < TOLERANCE
