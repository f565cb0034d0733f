"""Shared test helpers: random official-tree weights and running maxgemma on them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxgemma.model.config import ModelConfig
from maxgemma.model.gemma import Transformer
from maxgemma.model.params import stack_layers


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
  """Random float32 weights in the official (unrolled) tree, norm scales included (not zero)."""
  model = Transformer(cfg.replace(scan_layers=False))
  tokens = jnp.zeros((1, 4), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    std = 0.3 if "norm" in name else (cfg.d_model ** -0.5 if "embedding" in name else 0.08)
    return rng.normal(0.0, std, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def run_maxgemma(cfg: ModelConfig, official_params: dict, tokens, positions=None,
                 segment_ids=None) -> np.ndarray:
  """float32 logits of maxgemma (scanned or not, per `cfg`) on official-tree weights."""
  params = stack_layers(official_params) if cfg.scan_layers else official_params
  apply = jax.jit(Transformer(cfg).apply)  # one compile; op by op takes several times longer
  logits = apply({"params": params}, jnp.asarray(tokens),
                 None if positions is None else jnp.asarray(positions),
                 None if segment_ids is None else jnp.asarray(segment_ids))
  return np.asarray(logits)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b| relative to max |b|."""
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
