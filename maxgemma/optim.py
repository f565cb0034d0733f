"""The optimizer: learning-rate schedules and AdamW with clipping, a decay mask and bf16 moments.

Both functions read `config.optim` (an `ml_collections.ConfigDict`, any object with those
attributes, or a plain dict) and keep no defaults of their own: every key comes from the config,
whose defaults are `maxgemma.config.base_config()`. Gradient accumulation is the train step's job,
not the optimizer's.

Learning rate at optimizer step `t` (the count of updates already applied, starting at 0), with
`lr = learning_rate`, `w = warmup_steps`, `d = decay_steps` (unset: `total_steps`),
`end = learning_rate * end_lr_ratio` and `p = (t - w) / (d - w)` clipped to [0, 1]:

  t < w (warmup, all schedules):  lr * t / w            (0 at the first update)
  cosine:    end + (lr - end) * (1 + cos(pi * p)) / 2    (lr at t = w, end from t = d on)
  linear:    lr + (end - lr) * p                         (lr at t = w, end from t = d on)
  constant:  lr
  rsqrt:     lr * sqrt(max(w, 1) / max(t, w, 1))         (lr until max(w, 1), then inverse square
                                                          root; not floored, ignores d and end)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant", "rsqrt")
MOMENTS_DTYPES = ("float32", "bfloat16")

# Path components that mark a parameter excluded from weight decay.
_EMBEDDING_NAMES = ("input_embedding",)


_MISSING = object()


def _get(cfg: Any, name: str, *, may_be_none: bool = False) -> Any:
  """`cfg.name` for a ConfigDict/object or `cfg[name]` for a mapping; missing (or None, unless
  `may_be_none`) is an error."""
  if isinstance(cfg, Mapping):
    value = cfg.get(name, _MISSING)
  else:
    try:
      value = getattr(cfg, name)
    except (AttributeError, KeyError):
      value = _MISSING
  if value is _MISSING:
    raise ValueError(f"optim.{name} is missing from the optimizer config; start the config from "
                     "maxgemma.config.base_config(), which holds every default")
  if value is None and not may_be_none:
    raise ValueError(f"optim.{name} is None; set it to a value (see docs/config.md)")
  return value


def _schedule_args(optim_cfg: Any, total_steps: int | None) -> tuple[float, str, int, int, float]:
  """Validated (learning_rate, schedule, warmup_steps, decay_steps, end_lr)."""
  lr = float(_get(optim_cfg, "learning_rate"))
  kind = str(_get(optim_cfg, "schedule"))
  warmup = _get(optim_cfg, "warmup_steps")
  decay = _get(optim_cfg, "decay_steps", may_be_none=True)
  decay = total_steps if decay is None else decay
  end_ratio = float(_get(optim_cfg, "end_lr_ratio"))
  if kind not in SCHEDULES:
    raise ValueError(f"unknown optim.schedule {kind!r}; allowed: {', '.join(SCHEDULES)}")
  if not math.isfinite(lr) or lr < 0:
    raise ValueError(f"optim.learning_rate must be a finite number >= 0, got {lr}")
  if int(warmup) != warmup or warmup < 0:
    raise ValueError(f"optim.warmup_steps must be an integer >= 0, got {warmup}")
  if decay is None:
    raise ValueError("optim.decay_steps is unset and no total_steps was given")
  if int(decay) != decay or decay <= 0:
    raise ValueError(f"optim.decay_steps (unset: total_steps) must be an integer > 0, got {decay}")
  if warmup > decay:
    raise ValueError(f"optim.warmup_steps ({warmup}) exceeds the decay steps ({decay}: "
                     "optim.decay_steps, or train.steps when unset)")
  if not math.isfinite(end_ratio) or end_ratio < 0:
    raise ValueError(f"optim.end_lr_ratio must be a finite number >= 0, got {end_ratio}")
  return lr, kind, int(warmup), int(decay), lr * end_ratio


def learning_rate_schedule(optim_cfg: Any, total_steps: int | None) -> optax.Schedule:
  """The learning rate as a function of the optimizer step (see the module docstring)."""
  lr, kind, warmup, decay, end = _schedule_args(optim_cfg, total_steps)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    warm = lr * t / max(warmup, 1)
    p = jnp.clip((t - warmup) / max(decay - warmup, 1), 0.0, 1.0)
    if kind == "cosine":
      after = end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    elif kind == "linear":
      after = lr + (end - lr) * p
    elif kind == "constant":
      after = jnp.full_like(t, lr)
    else:  # rsqrt
      w = max(warmup, 1)
      after = lr * jnp.sqrt(w / jnp.maximum(t, w))
    return jnp.where(t < warmup, warm, after)

  return schedule


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    else:
      names.append(str(key))
  return names


def decay_mask(params: Any, *, decay_embeddings: bool = False) -> Any:
  """A tree of bools like `params`: True where weight decay applies.

  False for norm scales (any path with a `*_norm` component or a `scale` leaf) and, unless
  `decay_embeddings`, for embeddings (`input_embedding`). Works on plain nested dicts of arrays and
  on flax `nn.LogicallyPartitioned` boxed trees (the mask then holds the same boxes around bools).
  """
  def keep(path, _leaf) -> bool:
    names = [n for n in _path_names(path) if n != "value"]  # "value": a flax box's field
    if any(n.endswith("_norm") for n in names) or (names and names[-1] == "scale"):
      return False
    if not decay_embeddings and any(n in _EMBEDDING_NAMES for n in names):
      return False
    return True

  return jax.tree_util.tree_map_with_path(keep, params)


def _float32_updates() -> optax.GradientTransformation:
  """Casts floating-point updates to float32, so the optimizer math never runs in bf16."""
  def update(updates, state, params=None):
    del params
    cast = lambda g: g.astype(jnp.float32) if jnp.issubdtype(g.dtype, jnp.floating) else g
    return jax.tree.map(cast, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _scale_by_adam(b1: float, b2: float, eps: float, moments_dtype: str
                   ) -> optax.GradientTransformation:
  """optax's Adam scaling with BOTH moments stored in `moments_dtype` (math in float32).

  optax's `mu_dtype` covers the first moment only; the second is stored like the state's `nu`,
  so it is created in `moments_dtype` here and cast back after every update.
  """
  dtype = jnp.dtype(moments_dtype)
  inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=dtype)
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)

  def init(params):
    state = inner.init(params)
    return state._replace(nu=cast(state.nu))

  def update(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    return updates, state._replace(mu=cast(state.mu), nu=cast(state.nu))

  return optax.GradientTransformation(init, update)


def make_optimizer(optim_cfg: Any, total_steps: int | None) -> optax.GradientTransformation:
  """Clip by global norm -> Adam scaling -> masked decoupled weight decay -> scheduled lr.

  The update is `-lr(t) * (adam(clip(g)) + weight_decay * mask * param)` (AdamW). Parameters are
  expected in float32 (the master weights); gradients are cast to float32 before any math, and
  the moments are stored in `optim.moments_dtype` ("float32" or "bfloat16"). The state counts the
  steps that drive the schedule. `optim.clip_norm = 0` turns clipping off. Works on plain or
  flax-boxed (`nn.LogicallyPartitioned`) parameter trees; `optim.decay_embeddings` puts the
  embedding under weight decay.
  """
  lr_schedule = learning_rate_schedule(optim_cfg, total_steps)
  b1 = float(_get(optim_cfg, "b1"))
  b2 = float(_get(optim_cfg, "b2"))
  eps = float(_get(optim_cfg, "eps"))
  wd = float(_get(optim_cfg, "weight_decay"))
  clip = float(_get(optim_cfg, "clip_norm"))
  moments_dtype = str(_get(optim_cfg, "moments_dtype"))
  decay_embeddings = bool(_get(optim_cfg, "decay_embeddings"))
  for name, value in (("b1", b1), ("b2", b2)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f"optim.{name} must be in [0, 1), got {value}")
  for name, value in (("eps", eps), ("weight_decay", wd), ("clip_norm", clip)):
    if not math.isfinite(value) or value < 0:
      raise ValueError(f"optim.{name} must be a finite number >= 0, got {value}")
  if moments_dtype not in MOMENTS_DTYPES:
    raise ValueError(f"optim.moments_dtype must be one of {', '.join(MOMENTS_DTYPES)}, "
                     f"got {moments_dtype!r}")

  parts = [_float32_updates()]
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(_scale_by_adam(b1, b2, eps, moments_dtype))
  if wd > 0:
    parts.append(optax.add_decayed_weights(
        wd, mask=lambda p: decay_mask(p, decay_embeddings=decay_embeddings)))
  parts.append(optax.scale_by_learning_rate(lr_schedule))
  return optax.chain(*parts)
