"""Hugging Face `transformers` Gemma / Gemma2 / Gemma3Text: config and tensor name map.

Works on the official (unrolled) tree, see `maxgemma.model.params`. Tensors are numpy arrays in the
torch layout ([out, in] for linear weights). Shape letters: D d_model, N q heads, K kv heads,
H head dim, F ffn width.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maxgemma.model.config import ModelConfig

_ARCH = {"gemma1": ("gemma", "GemmaForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
         "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
# Block norms: ours -> HF's. Gemma 1's `post_attention_layernorm` is its pre-feed-forward norm.
_NORMS = {
    "gemma1": {"pre_attention_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"},
    "gemma2": {"pre_attention_norm": "input_layernorm",
               "post_attention_norm": "post_attention_layernorm",
               "pre_ffw_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
_NORMS["gemma3"] = _NORMS["gemma2"]


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """The `config.json` content of the equivalent transformers model."""
  model_type, arch = _ARCH[cfg.family]
  out: dict[str, Any] = {
      "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
      "attention_bias": False, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
  }
  if cfg.family == "gemma1":
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_global_base}
    return out
  layer_types = ["sliding_attention" if t == "local" else "full_attention"
                 for t in cfg.layer_types()]
  out.update(query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
             sliding_window=cfg.sliding_window, layer_types=layer_types,
             final_logit_softcapping=cfg.final_logit_softcap,
             attn_logit_softcapping=cfg.attn_logit_softcap)
  if cfg.family == "gemma2":
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_global_base}
  else:
    out["rope_parameters"] = {
        "sliding_attention": _rope(cfg.rope_local_base, cfg.rope_local_scale),
        "full_attention": _rope(cfg.rope_global_base, cfg.rope_global_scale)}
  return out


def _rope(base: float, scale: float) -> dict[str, Any]:
  if scale == 1.0:
    return {"rope_type": "default", "rope_theta": base}
  return {"rope_type": "linear", "rope_theta": base, "factor": scale}


def _proj(w_NDH: np.ndarray) -> np.ndarray:
  """[N, D, H] einsum weight -> torch Linear weight [N*H, D]."""
  N, D, H = w_NDH.shape
  return np.ascontiguousarray(w_NDH.transpose(0, 2, 1).reshape(N * H, D))


def _unproj(w: np.ndarray, N: int, H: int) -> np.ndarray:
  """torch Linear weight [N*H, D] -> [N, D, H]."""
  return np.ascontiguousarray(w.reshape(N, H, -1).transpose(0, 2, 1))


def to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Official-tree params -> HF state dict (names under `model.`)."""
  out = {"model.embed_tokens.weight": np.asarray(params["embedder"]["input_embedding"]),
         "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
  for i in range(cfg.num_layers):
    blk, pre = params[f"layer_{i}"], f"model.layers.{i}."
    attn = {k: np.asarray(v["w"]) for k, v in blk["attn"].items() if k.endswith("einsum")}
    if "qkv_einsum" in attn:
      q, k, v = attn["qkv_einsum"]
    else:
      q, (k, v) = attn["q_einsum"], attn["kv_einsum"]
    out[pre + "self_attn.q_proj.weight"] = _proj(q)
    out[pre + "self_attn.k_proj.weight"] = _proj(k)
    out[pre + "self_attn.v_proj.weight"] = _proj(v)
    out[pre + "self_attn.o_proj.weight"] = np.ascontiguousarray(
        attn["attn_vec_einsum"].reshape(-1, cfg.d_model).T)
    if cfg.use_qk_norm:
      out[pre + "self_attn.q_norm.weight"] = np.asarray(blk["attn"]["_query_norm"]["scale"])
      out[pre + "self_attn.k_norm.weight"] = np.asarray(blk["attn"]["_key_norm"]["scale"])
    gating = np.asarray(blk["mlp"]["gating_einsum"])
    if not cfg.transpose_gating_einsum:
      gating = gating.transpose(0, 2, 1)  # [2, D, F] -> [2, F, D]
    out[pre + "mlp.gate_proj.weight"] = np.ascontiguousarray(gating[0])
    out[pre + "mlp.up_proj.weight"] = np.ascontiguousarray(gating[1])
    out[pre + "mlp.down_proj.weight"] = np.ascontiguousarray(np.asarray(blk["mlp"]["linear"]).T)
    for ours, theirs in _NORMS[cfg.family].items():
      out[pre + theirs + ".weight"] = np.asarray(blk[ours]["scale"])
  return out


def from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """HF state dict -> official-tree params (the inverse of `to_hf`)."""
  N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
  params: dict[str, Any] = {"embedder": {"input_embedding": tensors["model.embed_tokens.weight"]},
                            "final_norm": {"scale": tensors["model.norm.weight"]}}
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    t = lambda name, pre=pre: tensors[pre + name + ".weight"]
    q, k, v = (_unproj(t("self_attn.q_proj"), N, H), _unproj(t("self_attn.k_proj"), K, H),
               _unproj(t("self_attn.v_proj"), K, H))
    attn: dict[str, Any] = {"attn_vec_einsum": {"w": np.ascontiguousarray(
        t("self_attn.o_proj").T.reshape(N, H, D))}}
    if N == K:
      attn["qkv_einsum"] = {"w": np.stack([q, k, v])}
    else:
      attn["q_einsum"], attn["kv_einsum"] = {"w": q}, {"w": np.stack([k, v])}
    if cfg.use_qk_norm:
      attn["_query_norm"] = {"scale": t("self_attn.q_norm")}
      attn["_key_norm"] = {"scale": t("self_attn.k_norm")}
    gating = np.stack([t("mlp.gate_proj"), t("mlp.up_proj")])  # [2, F, D]
    if not cfg.transpose_gating_einsum:
      gating = np.ascontiguousarray(gating.transpose(0, 2, 1))
    blk: dict[str, Any] = {"attn": attn, "mlp": {"gating_einsum": gating,
                                                 "linear": np.ascontiguousarray(
                                                     t("mlp.down_proj").T)}}
    for ours, theirs in _NORMS[cfg.family].items():
      blk[ours] = {"scale": t(theirs)}
    params[f"layer_{i}"] = blk
  return params
