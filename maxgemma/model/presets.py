"""Named model configurations: the published Gemma models and tiny ones for tests.

Sizes follow the Gemma technical reports, checked against the `transformers` config classes and
the official `gemma` library's models (tests/test_model.py).
Embedding rows are those of the official checkpoints (256,128 for Gemma 1/2); `vocab_size=256_000`
gives the Hugging Face checkpoints' counts.
"""

from __future__ import annotations

import difflib

from maxgemma.model.config import ModelConfig

GEMMA1_VOCAB = 256_128
GEMMA3_VOCAB = 262_144
GEMMA2_PATTERN = ("local", "global")
GEMMA3_PATTERN = ("local",) * 5 + ("global",)

_GEMMA2 = dict(family="gemma2", attention_pattern=GEMMA2_PATTERN, sliding_window=4096,
               attn_logit_softcap=50.0, final_logit_softcap=30.0, use_post_attn_norm=True,
               use_post_ffw_norm=True, vocab_size=GEMMA1_VOCAB, max_seq_len=8192)
_GEMMA3 = dict(family="gemma3", attention_pattern=GEMMA3_PATTERN, use_post_attn_norm=True,
               use_post_ffw_norm=True, use_qk_norm=True, rope_global_base=1_000_000.0,
               transpose_gating_einsum=True, vocab_size=GEMMA3_VOCAB, max_seq_len=32_768)

PRESETS: dict[str, ModelConfig] = {
    "gemma1_2b": ModelConfig(
        family="gemma1", num_layers=18, d_model=2048, ffn_dim=16_384, num_heads=8, num_kv_heads=1,
        head_dim=256, vocab_size=GEMMA1_VOCAB, max_seq_len=8192),
    "gemma1_7b": ModelConfig(
        family="gemma1", num_layers=28, d_model=3072, ffn_dim=24_576, num_heads=16,
        num_kv_heads=16, head_dim=256, vocab_size=GEMMA1_VOCAB, max_seq_len=8192),
    "gemma2_2b": ModelConfig(
        num_layers=26, d_model=2304, ffn_dim=9216, num_heads=8, num_kv_heads=4, head_dim=256,
        query_pre_attn_scalar=256, **_GEMMA2),
    "gemma2_9b": ModelConfig(
        num_layers=42, d_model=3584, ffn_dim=14_336, num_heads=16, num_kv_heads=8, head_dim=256,
        query_pre_attn_scalar=256, transpose_gating_einsum=True, **_GEMMA2),
    "gemma2_27b": ModelConfig(
        num_layers=46, d_model=4608, ffn_dim=36_864, num_heads=32, num_kv_heads=16, head_dim=128,
        query_pre_attn_scalar=4608 // 32, transpose_gating_einsum=True, **_GEMMA2),
    "gemma3_270m": ModelConfig(
        num_layers=18, d_model=640, ffn_dim=2048, num_heads=4, num_kv_heads=1, head_dim=256,
        query_pre_attn_scalar=256, sliding_window=512, **_GEMMA3),
    "gemma3_1b": ModelConfig(
        num_layers=26, d_model=1152, ffn_dim=6912, num_heads=4, num_kv_heads=1, head_dim=256,
        query_pre_attn_scalar=256, sliding_window=512, **_GEMMA3),
    # The text decoders of the 4B+ models (their vision encoder is not part of the preset): window
    # 1024 and global layers' RoPE positions divided by 8 (linear scaling).
    "gemma3_4b": ModelConfig(
        num_layers=34, d_model=2560, ffn_dim=10_240, num_heads=8, num_kv_heads=4, head_dim=256,
        query_pre_attn_scalar=256, sliding_window=1024, rope_global_scale=8.0, **_GEMMA3),
    "gemma3_12b": ModelConfig(
        num_layers=48, d_model=3840, ffn_dim=15_360, num_heads=16, num_kv_heads=8, head_dim=256,
        query_pre_attn_scalar=256, sliding_window=1024, rope_global_scale=8.0, **_GEMMA3),
    "gemma3_27b": ModelConfig(  # query scale 1/sqrt(d_model / heads) = 1/sqrt(168), as Gemma 2 27B
        num_layers=62, d_model=5376, ffn_dim=21_504, num_heads=32, num_kv_heads=16, head_dim=128,
        query_pre_attn_scalar=5376 // 32, sliding_window=1024, rope_global_scale=8.0, **_GEMMA3),
    # Tiny models for tests and the CPU demo: every feature of their family, sizes divisible by 16.
    "tiny_gemma1_mqa": ModelConfig(
        family="gemma1", num_layers=2, d_model=64, ffn_dim=128, num_heads=4, num_kv_heads=1,
        head_dim=16, vocab_size=512, max_seq_len=256),
    "tiny_gemma1_mha": ModelConfig(
        family="gemma1", num_layers=2, d_model=64, ffn_dim=128, num_heads=4, num_kv_heads=4,
        head_dim=16, vocab_size=512, max_seq_len=256),
    "tiny_gemma2": ModelConfig(  # query scale 1/sqrt(d_model / heads), as Gemma 2 27B
        num_layers=4, d_model=96, ffn_dim=128, num_heads=4, num_kv_heads=2, head_dim=16,
        **{**_GEMMA2, "vocab_size": 512, "max_seq_len": 256, "sliding_window": 8,
           "query_pre_attn_scalar": 24}),
    "tiny_gemma3": ModelConfig(
        num_layers=7, d_model=64, ffn_dim=128, num_heads=4, num_kv_heads=2, head_dim=16,
        **{**_GEMMA3, "vocab_size": 512, "max_seq_len": 256, "sliding_window": 8,
           "query_pre_attn_scalar": 16, "rope_global_scale": 8.0}),
    # The CPU demo's model: small enough to train in minutes on 2 cores, shaped like Gemma 2.
    "demo_gemma2": ModelConfig(
        num_layers=4, d_model=128, ffn_dim=512, num_heads=4, num_kv_heads=2, head_dim=32,
        **{**_GEMMA2, "vocab_size": 2048, "max_seq_len": 512, "sliding_window": 64,
           "query_pre_attn_scalar": 32}),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """The named preset with `overrides` applied, validated."""
  if name not in PRESETS:
    close = difflib.get_close_matches(name, PRESETS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model preset {name!r}.{hint} Known presets: {', '.join(PRESETS)}")
  return PRESETS[name].replace(**overrides).validate()
