"""Gemma's small layers: RMSNorm, the embedder and the GeGLU feed-forward.

Shape letters: B batch, L length, D d_model, F ffn width, V vocab.
Parameters carry logical axis names only; `maxgemma.sharding` maps them to mesh axes.
"""

from __future__ import annotations

import string

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple, dtype):
  """Declares a parameter annotated with logical axis names (one per dimension)."""
  assert len(axes) == len(shape), (name, axes, shape)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def dense_init(in_axis, out_axis, batch_axis=()):
  """Fan-in scaled truncated normal for an einsum weight (LeCun, as for Dense layers)."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=batch_axis)


def einsum(spec: str, x: Array, w: Array, **kwargs) -> Array:
  """`jnp.einsum(spec, x, w)`, computed with x's leading batch-like dims merged into one.

  The dims that lead `x`, are absent from `w` and appear together, in order, in the output (B and
  L of "BLD,DF->BLF") become one dimension. Same arithmetic; but XLA:CPU then emits plain 2-D
  matmuls (its backward otherwise contracts over B and L at once through a transposing copy).
  The feed-forward and the output logits use it when `ModelConfig.flatten_matmuls` is set (the
  CPU gain and the TPU memory cost are in docs/performance.md).
  """
  inputs, out = spec.split("->")
  xs, ws = inputs.split(",")
  n = 0
  while n < len(xs) and xs[n] not in ws:
    n += 1
  lead = xs[:n]
  if n < 2 or lead not in out:
    return jnp.einsum(spec, x, w, **kwargs)
  z = next(c for c in string.ascii_letters if c not in spec)
  y = jnp.einsum(f"{z}{xs[n:]},{ws}->{out.replace(lead, z)}", x.reshape(-1, *x.shape[n:]), w,
                 **kwargs)
  i = out.index(lead)
  return y.reshape(*y.shape[:i], *x.shape[:n], *y.shape[i + 1:])


class Einsum(nn.Module):
  """A weight `w` of a given shape and logical axes, applied with an einsum spec."""

  shape: tuple[int, ...]
  axes: tuple
  init: nn.initializers.Initializer
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, spec: str, x: Array) -> Array:
    w = param(self, "w", self.init, self.shape, self.axes, self.param_dtype)
    return jnp.einsum(spec, x, w.astype(self.dtype))


class RMSNorm(nn.Module):
  """Gemma RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + scale), in float32."""

  eps: float = 1e-6
  axis_name: str = "embed"
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param(self, "scale", nn.initializers.zeros_init(), (x.shape[-1],), (self.axis_name,),
                  self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
  """Token embedding, scaled by sqrt(D); `attend` gives the tied output logits."""

  vocab_size: int
  d_model: int
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  flatten: bool = False  # merge B and L for the logits matmul (`einsum`)

  def setup(self):
    init = nn.initializers.normal(stddev=self.d_model ** -0.5)
    self.input_embedding = param(self, "input_embedding", init, (self.vocab_size, self.d_model),
                                 ("vocab", "embed"), self.param_dtype)

  def encode(self, tokens_BL: Array) -> Array:
    x_BLD = jnp.take(self.input_embedding, tokens_BL, axis=0).astype(self.dtype)
    # The multiplier is cast to the activation dtype before use, as in the reference models.
    return x_BLD * jnp.asarray(self.d_model ** 0.5, self.dtype)

  def attend(self, x_BLD: Array) -> Array:
    """Logits x @ E^T, accumulated (and returned) in float32."""
    w_VD = self.input_embedding.astype(self.dtype)
    return (einsum if self.flatten else jnp.einsum)("BLD,VD->BLV", x_BLD, w_VD,
                                                    preferred_element_type=jnp.float32)


class FeedForward(nn.Module):
  """GeGLU: linear(gelu_tanh(x @ W_gate) * (x @ W_up))."""

  d_model: int
  ffn_dim: int
  transpose_gating: bool = False  # store gating as [2, F, D] (Gemma 2 9B/27B, Gemma 3)
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  flatten: bool = False  # merge B and L for the three matmuls (`einsum`)

  def project(self, weight: str, index: int | None, spec: str, x: Array, w: Array) -> Array:
    """`x` through the parameter `weight` (its slice `index` along the stacking axis, or the whole
    of it): one of the three matmuls, a method of its own so that a flax method interceptor can
    add to it (maxgemma.lora's unmerged adapters)."""
    return (einsum if self.flatten else jnp.einsum)(spec, x, w)

  @nn.compact
  def __call__(self, x_BLD: Array) -> Array:
    D, F = self.d_model, self.ffn_dim
    if self.transpose_gating:
      gating = param(self, "gating_einsum", dense_init(2, 1, 0), (2, F, D), (None, "mlp", "embed"),
                     self.param_dtype)
      spec = "BLD,FD->BLF"
    else:
      gating = param(self, "gating_einsum", dense_init(1, 2, 0), (2, D, F), (None, "embed", "mlp"),
                     self.param_dtype)
      spec = "BLD,DF->BLF"
    gating = gating.astype(self.dtype)
    gate_BLF = self.project("gating_einsum", 0, spec, x_BLD, gating[0])
    up_BLF = self.project("gating_einsum", 1, spec, x_BLD, gating[1])
    h_BLF = nn.gelu(gate_BLF, approximate=True) * up_BLF
    h_BLF = nn.with_logical_constraint(h_BLF, ("act_batch", "act_length", "act_mlp"))
    linear = param(self, "linear", dense_init(0, 1), (F, D), ("mlp", "embed"), self.param_dtype)
    return self.project("linear", None, "BLF,FD->BLD", h_BLF, linear.astype(self.dtype))
