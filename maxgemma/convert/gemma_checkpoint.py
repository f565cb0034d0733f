"""The official Gemma checkpoint format (orbax), as the `gemma` library reads it.

Released checkpoints hold a flat dict under `transformer/`: `transformer/layer_{i}/attn/q_einsum`
-> {"w": ...}, `transformer/layer_{i}/mlp/gating_einsum` -> {"w": ...} (the library's Flax tree
has no `w` there), `transformer/embedder` -> {"input_embedding": ...}, `.../pre_attention_norm` ->
{"scale": ...}. `gm.ckpts.load_params` turns that into the nested Flax tree (our unrolled tree).
We write that flat layout and read it back, or the nested one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxgemma.model.config import ModelConfig
from maxgemma.model.gemma import Transformer
from maxgemma.model.presets import PRESETS

PREFIX = "transformer"
CONFIG_FILE = "maxgemma_config.json"  # our sidecar: the official format carries no config


def to_flat(path: tuple[str, ...]) -> tuple[str, str]:
  """Official-tree leaf path -> (flat key, leaf name) of a released checkpoint."""
  if path[-2:] in (("mlp", "gating_einsum"), ("mlp", "linear")):
    path = (*path, "w")
  return "/".join((PREFIX, *path[:-1])), path[-1]


def from_stored(key: tuple[str, ...]) -> tuple[str, ...]:
  """A stored key (flat `('transformer/a/b', 'w')` or nested) -> the official-tree path."""
  parts = [p for k in key for p in k.split("/")]
  if parts and parts[0] == PREFIX:
    parts = parts[1:]
  if len(parts) >= 3 and parts[-3] == "mlp" and parts[-1] == "w":
    parts = parts[:-1]
  return tuple(parts)


def official_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every leaf of the official (unrolled) tree -> shape."""
  model = Transformer(cfg.replace(scan_layers=False))
  tree = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
  return {tuple(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree["params"])}


def infer_config(shapes: dict[tuple[str, ...], tuple[int, ...]]) -> ModelConfig | None:
  """The preset whose official tree has exactly these shapes (None if none or ambiguous)."""
  matches = []
  for name, cfg in PRESETS.items():
    if name.startswith(("tiny_", "demo_")):
      continue
    if official_shapes(cfg) == shapes:
      matches.append(cfg)
  return matches[0] if len(matches) == 1 else None


def check_shapes(found: dict[tuple[str, ...], tuple[int, ...]], cfg: ModelConfig,
                 where: str) -> None:
  """Raises one error listing missing, unexpected and mis-shaped tensors."""
  want = official_shapes(cfg)
  missing = sorted("/".join(k) for k in want.keys() - found.keys())
  extra = sorted("/".join(k) for k in found.keys() - want.keys())
  wrong = sorted(f"{'/'.join(k)} {found[k]} (config expects {want[k]})"
                 for k in want.keys() & found.keys() if tuple(found[k]) != want[k])
  if missing or extra or wrong:
    raise ValueError(describe_mismatch(where, missing, extra, wrong))


def describe_mismatch(where: str, missing: list[str], extra: list[str], wrong: list[str]) -> str:
  parts = []
  for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
    if names:
      more = f" (+{len(names) - 6} more)" if len(names) > 6 else ""
      parts.append(f"{label}: {', '.join(names[:6])}{more}")
  return (f"{where}: the tensors do not match the model config ({'; '.join(parts)}); pass the "
          "right --preset/config or check the file")


def np_dtype(name: str):
  return {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}[name]
