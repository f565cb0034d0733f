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
NORM_NAMES = _NORMS  # ours -> HF block norm names, per family


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


def layer_to_hf(blk: dict, cfg: ModelConfig, i: int) -> dict[str, np.ndarray]:
  """One official-tree block (`layer_{i}`) -> its HF tensors, in a fixed order."""
  out, pre = {}, f"model.layers.{i}."
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


def layer_from_hf(get, cfg: ModelConfig, i: int) -> dict:
  """HF tensors of layer i (`get(name)` returns one) -> the official-tree block `layer_{i}`."""
  N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
  pre = f"model.layers.{i}."
  t = lambda name: get(pre + name + ".weight")
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
  return blk


EMBED, FINAL_NORM = "model.embed_tokens.weight", "model.norm.weight"


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name -> shape, in file order (embedding, layers, final norm)."""
  N, K, H, D, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model, cfg.ffn_dim
  out: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, D)}
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    out.update({pre + "self_attn.q_proj.weight": (N * H, D),
                pre + "self_attn.k_proj.weight": (K * H, D),
                pre + "self_attn.v_proj.weight": (K * H, D),
                pre + "self_attn.o_proj.weight": (D, N * H)})
    if cfg.use_qk_norm:
      out.update({pre + "self_attn.q_norm.weight": (H,), pre + "self_attn.k_norm.weight": (H,)})
    out.update({pre + "mlp.gate_proj.weight": (F, D), pre + "mlp.up_proj.weight": (F, D),
                pre + "mlp.down_proj.weight": (D, F)})
    for theirs in _NORMS[cfg.family].values():
      out[pre + theirs + ".weight"] = (D,)
  out[FINAL_NORM] = (D,)
  return out


def to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Official-tree params -> HF state dict (names under `model.`)."""
  out = {EMBED: np.asarray(params["embedder"]["input_embedding"])}
  for i in range(cfg.num_layers):
    out.update(layer_to_hf(params[f"layer_{i}"], cfg, i))
  out[FINAL_NORM] = np.asarray(params["final_norm"]["scale"])
  return out


def from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """HF state dict -> official-tree params (the inverse of `to_hf`)."""
  params: dict[str, Any] = {"embedder": {"input_embedding": tensors[EMBED]},
                            "final_norm": {"scale": tensors[FINAL_NORM]}}
  for i in range(cfg.num_layers):
    params[f"layer_{i}"] = layer_from_hf(tensors.__getitem__, cfg, i)
  return params


def _period(types: list[str]) -> tuple[str, ...]:
  """The shortest pattern that, repeated from layer 0, gives `types`."""
  for p in range(1, len(types) + 1):
    if all(types[i] == types[i % p] for i in range(len(types))):
      return tuple(types[:p])
  return tuple(types)


def gating_transposed(family: str, d_model: int) -> bool:
  """The official layout of `gating_einsum`: [2, F, D] for Gemma 2 9B/27B and Gemma 3."""
  return family == "gemma3" or (family == "gemma2" and d_model > 2304)


def config_from_hf(c: dict[str, Any], where: str = "config.json") -> ModelConfig:
  """A ModelConfig from a transformers `config.json` (Gemma, Gemma2, Gemma3Text)."""
  families = {"gemma": "gemma1", "gemma2": "gemma2", "gemma3_text": "gemma3"}
  model_type = c.get("model_type")
  if model_type not in families:
    hint = (" (a multimodal Gemma 3: convert its text model, Gemma3ForCausalLM)"
            if model_type == "gemma3" else "")
    raise ValueError(f"{where}: model_type {model_type!r} is not supported{hint}; supported: "
                     f"{', '.join(families)}")
  family = families[model_type]
  try:
    d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    kw: dict[str, Any] = dict(
        family=family, num_layers=int(c["num_hidden_layers"]), d_model=d,
        ffn_dim=int(c["intermediate_size"]), num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or d // heads), vocab_size=int(c["vocab_size"]),
        max_seq_len=int(c.get("max_position_embeddings", 8192)),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)))
  except KeyError as e:
    raise ValueError(f"{where}: missing field {e.args[0]!r}") from None
  act = c.get("hidden_activation") or c.get("hidden_act")
  if act not in (None, "gelu_pytorch_tanh", "gelu"):  # Gemma 1 configs say "gelu" (tanh in use)
    raise ValueError(f"{where}: activation {act!r} is not Gemma's gelu_pytorch_tanh")
  rope = c.get("rope_parameters") or {}
  legacy_theta = c.get("rope_theta", 10_000.0)
  if family == "gemma1":
    kw["rope_global_base"] = kw["rope_local_base"] = float(rope.get("rope_theta", legacy_theta))
    return ModelConfig(**kw, transpose_gating_einsum=False).validate()
  n = kw["num_layers"]
  types = c.get("layer_types")
  if types is None:  # older configs: Gemma 2 alternates, Gemma 3 has sliding_window_pattern
    period = int(c.get("sliding_window_pattern", 2 if family == "gemma2" else 6))
    types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
             for i in range(n)]
  if len(types) != n:
    raise ValueError(f"{where}: layer_types has {len(types)} entries for {n} layers")
  kw["attention_pattern"] = _period(["local" if t == "sliding_attention" else "global"
                                     for t in types])
  kw["sliding_window"] = c.get("sliding_window") if "local" in kw["attention_pattern"] else None
  kw.update(query_pre_attn_scalar=c.get("query_pre_attn_scalar", 256),
            final_logit_softcap=c.get("final_logit_softcapping"),
            use_post_attn_norm=True, use_post_ffw_norm=True,
            transpose_gating_einsum=gating_transposed(family, d))
  if family == "gemma2":
    kw["attn_logit_softcap"] = c.get("attn_logit_softcapping")
    base = float(rope.get("rope_theta", legacy_theta))
    kw["rope_local_base"] = kw["rope_global_base"] = base
  else:
    kw["use_qk_norm"] = True
    local = rope.get("sliding_attention") or {"rope_theta": c.get("rope_local_base_freq",
                                                                   10_000.0)}
    glob = rope.get("full_attention") or {"rope_theta": legacy_theta,
                                          **(c.get("rope_scaling") or {})}
    for name, r in (("local", local), ("global", glob)):
      kw[f"rope_{name}_base"] = float(r.get("rope_theta", 10_000.0))
      kw[f"rope_{name}_scale"] = float(r.get("factor", 1.0)) if r.get(
          "rope_type", "default") == "linear" else 1.0
  return ModelConfig(**kw).validate()
