"""Moving between the scanned parameter tree and the official per-layer Gemma tree.

Scanned: `layers/<block>` leaves carry a leading [num_layers] axis. Unrolled (official): one
`layer_{i}/<block>` subtree per layer. Everything else is shared.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

Params = dict[str, Any]


def unstack_layers(params: Params) -> Params:
  """Scanned tree -> official tree: splits every `layers/...` leaf along axis 0 into `layer_{i}`."""
  params = dict(nn.unbox(params))
  stacked = params.pop("layers", None)
  if stacked is None:
    return params
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    params[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def stack_layers(params: Params) -> Params:
  """Official tree -> scanned tree: stacks `layer_{i}` subtrees (in order) into `layers/...`."""
  params = dict(nn.unbox(params))
  names = sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k[6:]))
  if not names:
    return params
  if names != [f"layer_{i}" for i in range(len(names))]:
    raise ValueError(f"layer subtrees must be layer_0..layer_{len(names) - 1}, got {names}")
  blocks = [params.pop(k) for k in names]
  params["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
  return params


def count_params(params: Params) -> int:
  """Total number of parameters (works on arrays and on `jax.ShapeDtypeStruct`s)."""
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(nn.unbox(params))))
