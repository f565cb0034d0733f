"""GGUF (llama.cpp): tensor names, metadata, tokenizer and quantized storage for Gemma 1/2/3.

Tensors are the transformers ones (`maxgemma.convert.hf`) renamed, in the torch layout (GGUF
reverses the dims on disk, the `gguf` package handles that); llama.cpp permutes nothing for
Gemma. Norm weights are stored as `1 + scale`; since `(1 + s) - 1` loses the low bits of `s`,
we also store each exact `scale` under `maxgemma.norm_scale.<tensor>` and use it on import only
when `1 + exact` reproduces the stored tensor bit for bit (so a file edited elsewhere is read
the standard way). Architecture details llama.cpp derives from the model size (query scaling,
the layer pattern, local RoPE base) are stored under `maxgemma.*` and defaulted when absent.
"""

from __future__ import annotations

import os
import re
from typing import Any

import gguf
import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from maxgemma.model.config import ModelConfig

ARCH = {"gemma1": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}
FAMILY = {v: k for k, v in ARCH.items()}
Q = gguf.GGMLQuantizationType
OUT_TYPES = {"float32": Q.F32, "float16": Q.F16, "bfloat16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
EXACT_KEY = "maxgemma.norm_scale."

_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
          "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_name(hf_name: str, family: str) -> str:
  """transformers tensor name -> GGUF tensor name."""
  if hf_name == "model.embed_tokens.weight":
    return "token_embd.weight"
  if hf_name == "model.norm.weight":
    return "output_norm.weight"
  m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
  if not m:
    raise KeyError(f"no GGUF name for tensor {hf_name}")
  i, part = m.groups()
  if part == "post_attention_layernorm":  # Gemma 1's is the pre-feed-forward norm
    name = "ffn_norm" if family == "gemma1" else "post_attention_norm"
  else:
    name = _LAYER[part]
  return f"blk.{i}.{name}.weight"


def is_norm(name: str) -> bool:
  return name.endswith("norm.weight")


def storage_type(shape: tuple[int, ...], out_type: Q) -> Q:
  """llama.cpp's rule: 1-D tensors stay F32; Q8_0 needs rows divisible by 32 (else F16)."""
  if len(shape) == 1:
    return Q.F32
  if out_type == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
    return Q.F16
  return out_type


def encode(array: np.ndarray, qtype: Q) -> np.ndarray:
  """float array -> the bytes (or f32/f16 array) GGUF stores for `qtype`."""
  a = np.asarray(array, np.float32)
  if qtype == Q.F32:
    return np.ascontiguousarray(a)
  if qtype == Q.F16:
    return a.astype(np.float16)
  return gguf.quants.quantize(a, qtype)


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  return int(np.prod(shape, dtype=np.int64)) // block * size


# ---------------------------------------------------------------------------------------------
# Metadata


def add_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, out_type: Q, name: str) -> None:
  """Model hyper-parameters under the llama.cpp keys, plus `maxgemma.*` for the rest."""
  w.add_name(name)
  w.add_file_type(FILE_TYPES[out_type])
  w.add_quantization_version(gguf.GGML_QUANT_VERSION)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.d_model)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.ffn_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_rope_freq_base(cfg.rope_global_base)
  if cfg.family == "gemma3":
    w.add_rope_freq_base_swa(cfg.rope_local_base)
    if cfg.rope_global_scale != 1.0:
      w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
      w.add_rope_scaling_factor(cfg.rope_global_scale)
  if cfg.sliding_window:
    w.add_sliding_window(cfg.sliding_window)
  if cfg.attn_logit_softcap:
    w.add_attn_logit_softcapping(cfg.attn_logit_softcap)
  if cfg.final_logit_softcap:
    w.add_final_logit_softcapping(cfg.final_logit_softcap)
  w.add_array("maxgemma.attention_pattern", list(cfg.attention_pattern))
  w.add_float32("maxgemma.query_pre_attn_scalar", float(cfg.query_pre_attn_scalar or cfg.head_dim))
  w.add_float32("maxgemma.rope_local_base", cfg.rope_local_base)
  w.add_float32("maxgemma.rope_local_scale", cfg.rope_local_scale)
  w.add_float32("maxgemma.rope_global_scale", cfg.rope_global_scale)
  w.add_bool("maxgemma.transpose_gating_einsum", cfg.transpose_gating_einsum)


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
  f = reader.get_field(key)
  if f is None:
    return default
  value = f.contents()
  return value


def config_from_metadata(reader: gguf.GGUFReader, where: str) -> ModelConfig:
  """A ModelConfig from GGUF metadata (llama.cpp keys; `maxgemma.*` when we wrote the file)."""
  arch = field(reader, "general.architecture")
  if arch not in FAMILY:
    raise ValueError(f"{where}: architecture {arch!r} is not supported; supported: "
                     f"{', '.join(FAMILY)} (Gemma 1/2/3 text models)")
  family = FAMILY[arch]
  a = lambda key, default=None: field(reader, f"{arch}.{key}", default)
  required = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")
  missing = [f"{arch}.{k}" for k in required if a(k) is None]
  if missing:
    raise ValueError(f"{where}: metadata lacks {', '.join(missing)}")
  d, heads, n = int(a("embedding_length")), int(a("attention.head_count")), int(a("block_count"))
  head_dim = int(a("attention.key_length", d // heads))
  embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embd is None:
    raise ValueError(f"{where}: tensor token_embd.weight is missing")
  vocab = int(embd.shape[1])  # GGUF dims are reversed: [D, V]
  big = d in (4608, 5376)  # Gemma 2/3 27B scale queries by d_model / heads (llama.cpp's rule)
  pattern_default = {"gemma1": ["global"], "gemma2": ["local", "global"],
                     "gemma3": ["local"] * 5 + ["global"]}[family]
  pattern = tuple(a("maxgemma.attention_pattern") or field(
      reader, "maxgemma.attention_pattern") or pattern_default)
  base = float(a("rope.freq_base", 10_000.0))
  kw: dict[str, Any] = dict(
      family=family, num_layers=n, d_model=d, ffn_dim=int(a("feed_forward_length")),
      num_heads=heads, num_kv_heads=int(a("attention.head_count_kv", heads)), head_dim=head_dim,
      vocab_size=vocab, max_seq_len=int(a("context_length", 8192)),
      norm_eps=_f32(a("attention.layer_norm_rms_epsilon", 1e-6)),
      rope_global_base=base, attention_pattern=pattern)
  if family == "gemma1":
    kw.update(rope_local_base=base, attention_pattern=("global",),
              transpose_gating_einsum=bool(field(reader, "maxgemma.transpose_gating_einsum",
                                                 False)))
    return ModelConfig(**kw).validate()
  scalar = field(reader, "maxgemma.query_pre_attn_scalar")
  local_base = field(reader, "maxgemma.rope_local_base",
                     a("rope.freq_base_swa", 10_000.0 if family == "gemma3" else base))
  kw.update(sliding_window=a("attention.sliding_window"), use_post_attn_norm=True,
            use_post_ffw_norm=True,
            query_pre_attn_scalar=float(scalar) if scalar is not None else (
                d // heads if big else head_dim),
            attn_logit_softcap=a("attn_logit_softcapping") if family == "gemma2" else None,
            final_logit_softcap=a("final_logit_softcapping"),
            rope_local_base=float(local_base),
            rope_local_scale=float(field(reader, "maxgemma.rope_local_scale", 1.0)),
            rope_global_scale=float(field(reader, "maxgemma.rope_global_scale",
                                          a("rope.scaling.factor", 1.0))),
            use_qk_norm=family == "gemma3")
  from maxgemma.convert.hf import gating_transposed  # noqa: PLC0415
  kw["transpose_gating_einsum"] = bool(field(reader, "maxgemma.transpose_gating_einsum",
                                             gating_transposed(family, d)))
  return ModelConfig(**kw).validate()


def _f32(value: float) -> float:
  """A float32 metadata value as the shortest decimal that rounds to it (1e-6, not 9.99e-7)."""
  return float(str(np.float32(value)))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def add_tokenizer(w: gguf.GGUFWriter, proto: bytes, vocab_size: int) -> None:
  """The SentencePiece model as llama.cpp's `llama` tokenizer (padded to the embedding rows)."""
  m = sp_pb2.ModelProto()
  m.ParseFromString(proto)
  pieces = [p.piece for p in m.pieces]
  if len(pieces) > vocab_size:
    raise ValueError(f"the tokenizer has {len(pieces)} pieces but the model only {vocab_size} "
                     "embedding rows; pass the model's own --tokenizer")
  scores = [p.score for p in m.pieces]
  types = [int(p.type) for p in m.pieces]
  for i in range(len(pieces), vocab_size):  # llama.cpp pads the same way
    pieces.append(f"[PAD{i}]")
    scores.append(-1000.0)
    types.append(sp_pb2.ModelProto.SentencePiece.UNUSED)
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list(pieces)
  w.add_token_scores(scores)
  w.add_token_types(types)
  t = m.trainer_spec
  w.add_bos_token_id(t.bos_id)
  w.add_eos_token_id(t.eos_id)
  w.add_unk_token_id(t.unk_id)
  if t.pad_id >= 0:
    w.add_pad_token_id(t.pad_id)
  if "<end_of_turn>" in pieces:
    w.add_eot_token_id(pieces.index("<end_of_turn>"))
  w.add_add_bos_token(True)
  w.add_add_eos_token(False)
  w.add_add_space_prefix(m.normalizer_spec.add_dummy_prefix)


def tokenizer_from_metadata(reader: gguf.GGUFReader, where: str) -> bytes | None:
  """A SentencePiece model rebuilt from `tokenizer.ggml.*` (None if the file has none)."""
  model = field(reader, "tokenizer.ggml.model")
  if model is None:
    return None
  if model != "llama":
    raise ValueError(f"{where}: tokenizer.ggml.model is {model!r}; only SentencePiece ('llama') "
                     "tokenizers can be rebuilt")
  pieces = list(field(reader, "tokenizer.ggml.tokens"))
  scores = list(field(reader, "tokenizer.ggml.scores", [0.0] * len(pieces)))
  types = [int(t) for t in field(reader, "tokenizer.ggml.token_type", [1] * len(pieces))]
  n = len(pieces)
  unused = sp_pb2.ModelProto.SentencePiece.UNUSED
  while n and types[n - 1] == unused and pieces[n - 1] == f"[PAD{n - 1}]":
    n -= 1  # the padding llama.cpp (and our export) adds up to the embedding rows
  m = sp_pb2.ModelProto()
  for p, s, t in zip(pieces[:n], scores[:n], types[:n], strict=True):
    m.pieces.add(piece=p, score=float(s), type=t)
  ts = m.trainer_spec
  ts.model_type = sp_pb2.TrainerSpec.BPE
  ts.vocab_size = n
  ts.byte_fallback = sp_pb2.ModelProto.SentencePiece.BYTE in types[:n]
  ts.allow_whitespace_only_pieces = True
  ts.split_digits = True
  ts.unk_id = int(field(reader, "tokenizer.ggml.unknown_token_id", 3))
  ts.bos_id = int(field(reader, "tokenizer.ggml.bos_token_id", 2))
  ts.eos_id = int(field(reader, "tokenizer.ggml.eos_token_id", 1))
  ts.pad_id = int(field(reader, "tokenizer.ggml.padding_token_id", -1))
  for name in ("unk", "bos", "eos", "pad"):
    i = getattr(ts, f"{name}_id")
    if 0 <= i < n:
      setattr(ts, f"{name}_piece", pieces[i])
  ns = m.normalizer_spec
  ns.name = "identity"
  ns.add_dummy_prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", False))
  ns.remove_extra_whitespaces = False
  ns.escape_whitespaces = True
  return m.SerializeToString()


# ---------------------------------------------------------------------------------------------
# Reading


class GGUFFile:
  """A GGUF file checked up front: known tensor types, data inside the file."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} does not exist")
    self._check_types(path)
    try:
      self.reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError on damaged files
      raise ValueError(f"{path} cannot be read as GGUF ({type(e).__name__}: {e}); the file is "
                       "truncated or corrupt: re-download or re-export it") from None
    size = os.path.getsize(path)
    self.tensors = {t.name: t for t in self.reader.tensors}
    for t in self.reader.tensors:
      if t.data_offset + t.n_bytes > size:
        raise ValueError(f"{path} is truncated: tensor {t.name} ends at byte "
                         f"{t.data_offset + t.n_bytes}, the file has {size}")
      if t.tensor_type not in (Q.F32, Q.F16) and t.tensor_type not in gguf.quants._type_traits:
        raise ValueError(f"{path}: tensor {t.name} uses quantization {t.tensor_type.name}, "
                         "which cannot be dequantized here; use an F32/F16/BF16/Q8_0/K-quant file")

  @staticmethod
  def _check_types(path: str) -> None:
    """Names the tensor whose type id no GGML version defines (before the reader trips on it)."""
    class Probe(gguf.GGUFReader):
      def _build_tensors(self, start_offs, fields):  # noqa: ANN001
        for f in fields:
          name = bytes(f.parts[1]).decode("utf-8", "replace")
          raw = int(f.parts[4][0])
          if raw not in Q._value2member_map_:
            raise _UnknownTypeError(
                f"{path}: tensor {name} has unknown quantization type id {raw}; this file "
                "needs a newer reader (or convert it to a known type)")
        self.tensors = []
    try:
      Probe(path)
    except _UnknownTypeError as e:
      raise ValueError(str(e)) from None
    except Exception:  # noqa: BLE001  (damaged files get their error from the real reader)
      pass

  def shape(self, name: str) -> tuple[int, ...]:
    """numpy (torch-layout) shape of a tensor."""
    return tuple(int(x) for x in reversed(self.tensors[name].shape.tolist()))

  def read(self, name: str) -> np.ndarray:
    """A tensor dequantized to float32 in numpy (torch) layout."""
    t = self.tensors[name]
    if t.tensor_type == Q.F32:
      out = np.array(t.data, np.float32)
    else:
      out = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    return out.reshape(self.shape(name))

  def read_scale(self, name: str) -> np.ndarray:
    """A norm's `scale` (GGUF stores 1 + scale); exact when our sidecar matches the tensor."""
    stored = self.read(name)
    exact = field(self.reader, EXACT_KEY + name)
    if exact is not None:
      exact = np.asarray(exact, np.float32).reshape(stored.shape)
      if np.array_equal((np.float32(1) + exact).view(np.uint32), stored.view(np.uint32)):
        return exact
    return stored - np.float32(1)


class _UnknownTypeError(Exception):
  pass
