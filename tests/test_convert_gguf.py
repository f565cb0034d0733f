"""GGUF export/import against the `gguf` package and transformers' GGUF loader.

References: `gguf.get_tensor_name_map` (llama.cpp's own name table), `gguf.GGUFReader` +
`gguf.quants.dequantize`, and transformers' `load_gguf_checkpoint` (its GGUF loader; it has no
Gemma 1 support, and `from_pretrained(gguf_file=...)` needs accelerate, which is not installed:
the loader's tensors go into a model built from our config, since its GGUF config mapping lacks
query scaling and soft-caps for these tiny shapes).
"""

import os

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from maxgemma.checkpoint import load_params
from maxgemma.convert import gguf_format, hf
from maxgemma.data.tokenizer import load_tokenizer
from maxgemma.export import export
from maxgemma.import_weights import import_weights
from maxgemma.model.params import unstack_layers
from maxgemma.model.presets import get_preset
from tests.convert_utils import (
  PRESETS,
  VOCAB,
  hf_model_from_state,
  make_workdir,
  tokens_for,
  torch_logits,
)
from tests.model_utils import rel_err, run_maxgemma

TOLERANCE = 1e-5
ARCH = {"gemma1": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2,
        "gemma3": gguf.MODEL_ARCH.GEMMA3}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """{preset: (cfg, official params, f32 gguf path)}."""
  root = str(tmp_path_factory.mktemp("gguf"))
  out = {}
  for preset in PRESETS:
    workdir, cfg, params = make_workdir(root, preset)
    path = os.path.join(root, f"{preset}.gguf")
    export(workdir, "gguf", path)
    out[preset] = (workdir, cfg, params, path)
  return out


@pytest.mark.parametrize("preset", PRESETS)
def test_names_match_llama_cpp_table(preset):
  cfg = get_preset(preset)
  table = gguf.get_tensor_name_map(ARCH[cfg.family], cfg.num_layers)
  for name in hf.hf_shapes(cfg):
    assert gguf_format.gguf_name(name, cfg.family) == table.get_name(name[:-len(".weight")]) + \
        ".weight", name


def read_back_with_gguf(path: str, cfg) -> dict:
  """HF state dict from a GGUF file using only the gguf package (its names, its dequantizer)."""
  reader = gguf.GGUFReader(path)
  table = gguf.get_tensor_name_map(ARCH[cfg.family], cfg.num_layers)
  back = {table.get_name(n[:-len(".weight")]) + ".weight": n for n in hf.hf_shapes(cfg)}
  state = {}
  for t in reader.tensors:
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape(tuple(reversed(t.shape.tolist())))
    if t.name.endswith("norm.weight"):
      w = w - np.float32(1)
    state[back[t.name]] = w
  return state


@pytest.mark.parametrize("preset", PRESETS)
def test_f32_logits_read_back_with_gguf(exported, preset):
  _, cfg, params, path = exported[preset]
  assert gguf.GGUFReader(path).get_field("general.architecture").contents() == \
      {"gemma1": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}[cfg.family]
  tokens = tokens_for(cfg)
  theirs = torch_logits(hf_model_from_state(cfg, read_back_with_gguf(path, cfg)), tokens)
  err = rel_err(run_maxgemma(cfg.replace(dtype="float32"), params, tokens), theirs)
  print(f"gguf f32 {preset} (gguf reader): max relative logit difference {err:.2e}")
  assert err < TOLERANCE


@pytest.mark.parametrize("preset", ["tiny_gemma2", "tiny_gemma3"])
def test_f32_logits_via_transformers_gguf_loader(exported, preset):
  _, cfg, params, path = exported[preset]
  config = transformers.AutoConfig.for_model(**hf.hf_config(cfg))
  shell = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  loaded = load_gguf_checkpoint(path, return_tensors=True, model_to_load=shell)
  parsed = loaded["config"]
  assert (parsed["hidden_size"], parsed["num_hidden_layers"], parsed["num_key_value_heads"],
          parsed["sliding_window"], parsed["vocab_size"]) == (
              cfg.d_model, cfg.num_layers, cfg.num_kv_heads, cfg.sliding_window, cfg.vocab_size)
  state = {k: v.numpy() for k, v in loaded["tensors"].items()}
  tokens = tokens_for(cfg)
  theirs = torch_logits(hf_model_from_state(cfg, state), tokens)
  err = rel_err(run_maxgemma(cfg.replace(dtype="float32"), params, tokens), theirs)
  print(f"gguf f32 {preset} (transformers loader): max relative logit difference {err:.2e}")
  assert err < TOLERANCE


def test_tokenizer_in_metadata_loads_in_transformers(exported):
  _, _, _, path = exported["tiny_gemma2"]
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  text = "Hello world 2024, <start_of_turn>user\nok<end_of_turn>"
  assert tok(text)["input_ids"] == load_tokenizer("").encode(text, add_bos=True)


@pytest.mark.parametrize("dtype,qtype,tol", [("float16", "F16", 1e-2), ("bfloat16", "BF16", 5e-2),
                                             ("q8_0", "Q8_0", 5e-2)])
def test_reduced_precision_exports(exported, tmp_path, dtype, qtype, tol):
  workdir, cfg, params, _ = exported["tiny_gemma3"]
  path = str(tmp_path / f"m-{dtype}.gguf")
  export(workdir, "gguf", path, dtype=dtype)
  reader = gguf.GGUFReader(path)
  want = {gguf_format.gguf_name(n, cfg.family): a for n, a in hf.to_hf(params, cfg).items()}
  for t in reader.tensors:
    w = want[t.name] + (np.float32(1) if t.name.endswith("norm.weight") else 0)
    if w.ndim == 1:
      assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
      continue
    assert t.tensor_type.name == qtype, t.name
    # Exactly the gguf package's quantization of our weights.
    np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type),
                                  gguf.quants.dequantize(gguf.quants.quantize(
                                      w, t.tensor_type), t.tensor_type), err_msg=t.name)
  back = str(tmp_path / "imported")
  import_weights("gguf", path, back)
  imported, cfg2, _ = load_params(back)
  assert cfg2 == cfg
  tokens = tokens_for(cfg)
  ref = run_maxgemma(cfg.replace(dtype="float32"), params, tokens)
  err = rel_err(run_maxgemma(cfg.replace(dtype="float32"), unstack_layers(imported), tokens), ref)
  print(f"gguf {dtype}: max relative logit difference after import {err:.2e}")
  assert 0 < err < tol


def write_k_quant_file(path: str, cfg, qtype, seed: int = 0) -> None:
  """A GGUF whose matrices are random (valid) K-quant blocks, norms F32, as llama.cpp lays out."""
  rng = np.random.default_rng(seed)
  w = gguf.GGUFWriter(path, gguf_format.ARCH[cfg.family])
  gguf_format.add_metadata(w, cfg, gguf.GGMLQuantizationType.F32, "k-quant test")
  gguf_format.add_tokenizer(w, load_tokenizer("").model_proto, cfg.vocab_size)
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  for n, shape in hf.hf_shapes(cfg).items():
    name = gguf_format.gguf_name(n, cfg.family)
    if len(shape) == 1:
      w.add_tensor(name, (1 + rng.normal(0, 0.3, shape)).astype(np.float32))
      continue
    blocks = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    # The f16 super-block scales: Q4_K keeps d, dmin first; Q6_K keeps d last.
    scale = np.full(1, 2e-3, np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:
      blocks[:, 0:2], blocks[:, 2:4] = scale, np.full(1, 1e-3, np.float16).view(np.uint8)
    else:
      blocks[:, -2:] = np.full(1, 1e-4, np.float16).view(np.uint8)
    raw = blocks.reshape(shape[0], -1)
    w.add_tensor(name, raw, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("qname", ["Q4_K", "Q6_K"])
def test_import_k_quants_matches_transformers(tmp_path, qname):
  qtype = gguf.GGMLQuantizationType[qname]
  # K-quant blocks hold 256 values: every matrix row must be a multiple of 256 wide.
  cfg = get_preset("tiny_gemma2", vocab_size=VOCAB, d_model=256, ffn_dim=256, head_dim=64,
                   query_pre_attn_scalar=64)
  path = str(tmp_path / f"{qname}.gguf")
  write_k_quant_file(path, cfg, qtype)
  back = str(tmp_path / "imported")
  import_weights("gguf", path, back)
  imported, cfg2, _ = load_params(back)
  assert cfg2 == cfg
  config = transformers.AutoConfig.for_model(**hf.hf_config(cfg))
  shell = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  state = {k: v.numpy() for k, v in load_gguf_checkpoint(
      path, return_tensors=True, model_to_load=shell)["tensors"].items()}
  tokens = tokens_for(cfg)
  theirs = torch_logits(hf_model_from_state(cfg, state), tokens)
  ours = run_maxgemma(cfg.replace(dtype="float32"), unstack_layers(imported), tokens)
  err = rel_err(ours, theirs)
  print(f"gguf {qname} import vs transformers: max relative logit difference {err:.2e}")
  assert err < TOLERANCE
  assert np.std(state["model.layers.0.mlp.up_proj.weight"]) > 0  # really random, not zeros
