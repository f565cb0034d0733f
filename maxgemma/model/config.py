"""The model's architecture and run-time choices, as one frozen dataclass.

A `ModelConfig` names every size of a Gemma decoder. Presets live in `presets.py`; `validate()`
turns a bad combination into one clear `ValueError` that names the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from maxgemma.model.attention_reference import GLOBAL_WINDOW

LayerType = Literal["global", "local"]

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_qkv_proj",
                  "save_names", "offload_names", "names")
# The `checkpoint_name` tags of a block (q/k/v after RoPE, the attention context, the attention
# and feed-forward outputs) and what `remat_policy="names"` may do with each (`remat_names`).
REMAT_NAMES = ("qkv_proj", "attn_context", "attn_out", "mlp_out")
REMAT_ACTIONS = ("recompute", "save", "offload")
ATTENTION_IMPLS = ("xla", "dot_product", "splash", "ring")
DTYPES = ("float32", "bfloat16", "float16")
FAMILIES = ("gemma1", "gemma2", "gemma3")
SPLASH_BLOCKS = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                 "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every size and switch of a Gemma decoder (no defaults hidden elsewhere)."""

  family: str  # gemma1 | gemma2 | gemma3: which checkpoint formats and references apply.
  num_layers: int
  d_model: int  # D
  ffn_dim: int  # F, the width of ONE GeGLU branch
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  vocab_size: int  # V, embedding rows
  max_seq_len: int  # the context the model was built for
  # Attention layout: the per-layer pattern repeats from layer 0 ("local" = sliding window).
  attention_pattern: tuple[LayerType, ...] = ("global",)
  sliding_window: int | None = None
  query_pre_attn_scalar: float | None = None  # queries scaled by scalar**-0.5 (None: head_dim)
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  use_post_attn_norm: bool = False
  use_post_ffw_norm: bool = False
  use_qk_norm: bool = False
  rope_local_base: float = 10_000.0
  rope_global_base: float = 10_000.0
  rope_local_scale: float = 1.0  # linear RoPE scaling: positions divided by this
  rope_global_scale: float = 1.0
  transpose_gating_einsum: bool = False  # gating_einsum stored [2, F, D] instead of [2, D, F]
  norm_eps: float = 1e-6
  # Run-time choices: they change speed and memory, never the function computed (up to dtype).
  param_dtype: str = "float32"
  dtype: str = "bfloat16"  # compute dtype
  scan_layers: bool = True
  remat_policy: str = "full"
  remat_names: str = ""  # remat_policy "names": "name:action,..." (REMAT_NAMES, REMAT_ACTIONS)
  # xla (dense mask), dot_product, splash (TPU kernel; keys/values all-gathered under a sequence
  # axis), ring (XLA ring attention over the sequence axis: keys/values passed round, never
  # gathered; without a sequence axis it falls back to xla).
  attention_impl: str = "xla"
  # Feed-forward and logits matmuls on [B*L, D] instead of [B, L, D]: plain 2-D matmuls, faster
  # on XLA:CPU; off for TPU pods, where some layouts need more HBM (docs/performance.md).
  flatten_matmuls: bool = False
  # Splash kernel tiles (attention_impl "splash"), the fields of its BlockSizes; 0: the largest of
  # 512, 256, 128 dividing the length. Each must divide the sequence length.
  splash_block_q: int = 0
  splash_block_kv: int = 0
  splash_block_kv_compute: int = 0  # divides splash_block_kv
  splash_block_q_dkv: int = 0
  splash_block_kv_dkv: int = 0
  splash_block_kv_dkv_compute: int = 0  # divides splash_block_kv_dkv
  splash_block_q_dq: int = 0  # unused (must stay 0) with splash_fused_bwd
  splash_block_kv_dq: int = 0
  splash_fused_bwd: bool = False  # one backward kernel for dq, dk and dv

  @property
  def num_groups(self) -> int:
    """G: query heads that share one key/value head."""
    return self.num_heads // self.num_kv_heads

  @property
  def query_scale(self) -> float:
    scalar = self.query_pre_attn_scalar or self.head_dim
    return float(scalar) ** -0.5

  def layer_types(self) -> tuple[LayerType, ...]:
    """The attention type of each layer, the pattern repeated from layer 0."""
    p = self.attention_pattern
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  def layer_windows(self) -> tuple[int, ...]:
    """Each layer's attention window (`GLOBAL_WINDOW` for global layers)."""
    return tuple(self.sliding_window if t == "local" else GLOBAL_WINDOW
                 for t in self.layer_types())

  def splash_block_sizes(self) -> tuple[int | bool, ...]:
    """The splash tiles in `BlockSizes` order (block_q ... block_kv_dq, use_fused_bwd_kernel)."""
    return tuple(getattr(self, f"splash_{name}") for name in SPLASH_BLOCKS) + (
        self.splash_fused_bwd,)

  def offloads(self) -> bool:
    """Whether the remat policy moves saved activations to host memory."""
    return self.remat_policy == "offload_names" or "offload" in self.remat_actions().values()

  def remat_actions(self) -> dict[str, str]:
    """{name: action} of every REMAT_NAMES tag under remat_policy "names" (unnamed tags are
    recomputed); {} for the other policies."""
    if self.remat_policy != "names":
      if self.remat_names:
        raise ValueError(f"model.remat_names={self.remat_names!r} is read by "
                         "model.remat_policy=names only; set that policy or clear remat_names")
      return {}
    actions = dict.fromkeys(REMAT_NAMES, "recompute")
    for item in filter(None, (p.strip() for p in self.remat_names.split(","))):
      name, _, action = item.partition(":")
      if name not in REMAT_NAMES or action not in REMAT_ACTIONS:
        raise ValueError(f"model.remat_names: {item!r} is not name:action with a name of "
                         f"{', '.join(REMAT_NAMES)} and an action of {', '.join(REMAT_ACTIONS)}")
      actions[name] = action
    return actions

  def replace(self, **changes) -> ModelConfig:
    """A copy with fields changed; unknown names get an error listing the valid ones."""
    names = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(changes) - names)
    if unknown:
      raise ValueError(f"unknown model config field(s) {unknown}; valid fields: {sorted(names)}")
    return dataclasses.replace(self, **changes)

  def validate(self, seq_len: int | None = None) -> ModelConfig:
    """Raises ValueError naming the first bad field; returns self so calls chain."""
    positive = ("num_layers", "d_model", "ffn_dim", "num_heads", "num_kv_heads", "head_dim",
                "vocab_size", "max_seq_len")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
    _check_choice("family", self.family, FAMILIES)
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
    self.remat_actions()  # refuses a bad model.remat_names
    _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads "
          f"({self.num_kv_heads}); allowed num_kv_heads: {_divisors(self.num_heads)}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
    if not self.attention_pattern or any(t not in ("global", "local")
                                         for t in self.attention_pattern):
      raise ValueError(f"model.attention_pattern must be a non-empty tuple of 'global'/'local', "
                       f"got {self.attention_pattern!r}")
    if "local" in self.attention_pattern:
      if not self.sliding_window or self.sliding_window <= 0:
        raise ValueError("model.sliding_window must be a positive integer when "
                         f"model.attention_pattern has local layers, got {self.sliding_window!r}")
      if self.sliding_window > self.max_seq_len:
        raise ValueError(f"model.sliding_window ({self.sliding_window}) is larger than the context "
                         f"model.max_seq_len ({self.max_seq_len}); use a window <= the context")
    for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ValueError(f"model.{name} must be positive or None, got {value!r}")
    if seq_len is not None and seq_len > self.max_seq_len:
      raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len ({self.max_seq_len})")
    self._check_splash_blocks(seq_len)
    return self

  def _check_splash_blocks(self, seq_len: int | None) -> None:
    for name in SPLASH_BLOCKS:
      value = getattr(self, f"splash_{name}")
      if not isinstance(value, int) or value < 0:
        raise ValueError(f"model.splash_{name} must be a non-negative integer (0: default), "
                         f"got {value!r}")
      # The tiles only tile the length when the splash kernel runs (a pod config's tiles stay
      # valid under --config.model.attention_impl=xla at a short length).
      if value and seq_len is not None and seq_len % value and self.attention_impl == "splash":
        fits = [t for t in (128, 256, 512, 1024, 2048) if seq_len % t == 0]
        hint = f"use a divisor of it ({', '.join(map(str, fits))}) or 0 (default)" if fits else (
            "use 0 (default) or a length that is a multiple of 128")
        raise ValueError(f"model.splash_{name}={value} does not divide the sequence length "
                         f"{seq_len}; {hint}")
    for compute, block in (("block_kv_compute", "block_kv"),
                           ("block_kv_dkv_compute", "block_kv_dkv")):
      c, b = getattr(self, f"splash_{compute}"), getattr(self, f"splash_{block}")
      if c and b and b % c:
        raise ValueError(f"model.splash_{compute}={c} does not divide model.splash_{block}={b}; "
                         f"use a divisor of splash_{block} or 0 (the same as it)")
    if self.splash_fused_bwd and (self.splash_block_q_dq or self.splash_block_kv_dq):
      raise ValueError("model.splash_block_q_dq and model.splash_block_kv_dq must be 0 with "
                       "model.splash_fused_bwd=True (the fused backward has no dq kernel)")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"model.{name} is {value!r}; allowed values: {', '.join(allowed)}")


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]
