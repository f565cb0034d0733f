"""Model FLOPs per token, which MFU is computed from.

Formula (training = forward + backward = 3 x forward; a multiply-add counts 2 FLOPs):
  dense:     6 * (matmul weights per layer * layers + V * D)   (the tied output projection counts;
             the embedding lookup does not)
  attention: 12 * N * H * sum over layers of the mean attended context, where a causal layer
             attends (i + 1) keys at position i and a sliding-window layer min(i + 1, window).
Only the causal half of the score matrix is counted, and only the window on local layers: the
FLOPs the model needs, not what a dense kernel may spend.
"""

from __future__ import annotations

from maxgemma.model.config import ModelConfig


def matmul_params_per_layer(cfg: ModelConfig) -> int:
  """Weights used in matmuls by one block (q, k, v, output, gate, up, down)."""
  D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
  return D * H * (2 * N + 2 * K) + 3 * D * F


def mean_context(seq_len: int, window: int | None) -> float:
  """Mean number of keys a query attends over a causal row of `seq_len` (window-limited)."""
  L = seq_len
  if window is None or window >= L:
    return (L + 1) / 2
  # Positions 0..w-1 attend i + 1 keys; the remaining L - w attend w keys.
  return (window * (window + 1) / 2 + (L - window) * window) / L


def flops_per_token(cfg: ModelConfig, seq_len: int, *, training: bool = True) -> float:
  """Model FLOPs per token for a sequence of `seq_len` (training: x3 of the forward pass)."""
  dense = 2 * (matmul_params_per_layer(cfg) * cfg.num_layers + cfg.vocab_size * cfg.d_model)
  context = sum(mean_context(seq_len, w) for w in cfg.layer_windows())
  attention = 4 * cfg.num_heads * cfg.head_dim * context
  return (3.0 if training else 1.0) * (dense + attention)
