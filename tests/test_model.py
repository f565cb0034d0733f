"""The model against independent facts: published parameter counts, packing, scan vs unrolled,
FLOPs vs XLA's own count, and clear errors for bad input."""

import contextlib
import dataclasses
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxgemma.model import flops, layers
from maxgemma.model.config import REMAT_POLICIES
from maxgemma.model.gemma import Transformer
from maxgemma.model.params import count_params, stack_layers, unstack_layers
from maxgemma.model.presets import PRESETS, get_preset
from tests.gemma_lib import import_gemma, import_gemma_models
from tests.model_utils import random_params, rel_err, run_maxgemma
from tests.test_model_gemma_parity import official_config


def preset_count(name: str, **overrides) -> int:
  cfg = get_preset(name, **overrides)
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return count_params(shapes)


@pytest.mark.parametrize("name, vocab, expected", [
    # Published totals (shared/REFERENCE.md section 1): HF's 256,000 rows and the official 256,128.
    ("gemma1_2b", 256_000, 2_506_172_416),
    ("gemma1_7b", 256_000, 8_537_680_896),
    ("gemma1_2b", 256_128, 2_506_434_560),
    ("gemma1_7b", 256_128, 8_538_074_112),
])
def test_published_parameter_counts(name, vocab, expected):
  assert preset_count(name, vocab_size=vocab) == expected


def hf_count(cfg) -> int:
  """Parameters of the transformers model built from the same config (on the meta device)."""
  import torch
  import transformers

  from maxgemma.convert import hf
  config = transformers.AutoConfig.for_model(**hf.hf_config(cfg))
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config)
  return sum(p.numel() for p in model.parameters())  # tied lm_head is counted once


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("tiny")])
def test_preset_counts_match_reference_library(name):
  cfg = get_preset(name)
  assert preset_count(name) == hf_count(cfg)


# Parameters of the official `gemma` library's models (text decoders: Gemma 3 4B+ with
# `text_only=True`, no vision encoder), counted from `jax.eval_shape` of their init.
GEMMA_LIB_COUNTS = {
    "gemma2_2b": ("Gemma2_2B", 2_614_636_800),
    "gemma2_9b": ("Gemma2_9B", 9_242_164_736),
    "gemma2_27b": ("Gemma2_27B", 27_227_718_144),
    "gemma3_270m": ("Gemma3_270M", 268_098_176),
    "gemma3_1b": ("Gemma3_1B", 999_885_952),
    "gemma3_4b": ("Gemma3_4B", 3_880_099_328),
    "gemma3_12b": ("Gemma3_12B", 11_765_788_416),
    "gemma3_27b": ("Gemma3_27B", 27_009_002_240),
}


def gemma_lib_model(name: str):
  """The official library's text decoder for preset `name`."""
  models = import_gemma_models()
  cls = getattr(models, GEMMA_LIB_COUNTS[name][0])
  return cls(text_only=True) if issubclass(cls, models._Gemma3Base) else cls()


def test_every_gemma2_and_gemma3_preset_has_a_gemma_lib_count():
  published = {n for n, c in PRESETS.items() if c.family in ("gemma2", "gemma3")
               and not n.startswith(("tiny_", "demo_"))}
  assert published == set(GEMMA_LIB_COUNTS)


@pytest.mark.parametrize("name", GEMMA_LIB_COUNTS)
def test_preset_counts_match_official_gemma_library(name):
  model = gemma_lib_model(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  layers = {f"layer_{i}" for i in range(len(model.config.attention_types))}
  assert set(shapes["params"]) == {"embedder", "final_norm", *layers}  # the text decoder only
  assert set(shapes["params"]["embedder"]) == {"input_embedding"}  # no vision projection
  assert count_params(shapes) == GEMMA_LIB_COUNTS[name][1]
  assert preset_count(name) == GEMMA_LIB_COUNTS[name][1]


@pytest.mark.parametrize("name", GEMMA_LIB_COUNTS)
def test_preset_fields_match_official_gemma_library(name):
  """Every size and switch of the preset, as the library's config, equals the library's own."""
  theirs = dataclasses.replace(gemma_lib_model(name).config, vision_encoder=None)
  ours = official_config(import_gemma(), get_preset(name))
  diff = {f.name: (getattr(ours, f.name), getattr(theirs, f.name))
          for f in dataclasses.fields(theirs) if getattr(ours, f.name) != getattr(theirs, f.name)}
  assert not diff, f"preset {name} differs from the gemma library (ours, theirs): {diff}"


def test_packed_row_equals_documents_alone():
  cfg = get_preset("tiny_gemma3", dtype="float32")
  params = random_params(cfg, seed=5)
  rng = np.random.default_rng(6)
  lengths = [7, 12, 9]  # 12 > window 8: local layers mask inside a document too
  docs = [rng.integers(4, cfg.vocab_size, n) for n in lengths]
  pad = 4
  tokens = np.concatenate(docs + [np.zeros(pad, int)])[None]
  positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad, int)])[None]
  segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]
                            + [np.zeros(pad, int)])[None]
  packed = run_maxgemma(cfg, params, tokens, positions, segments)[0]
  start = 0
  for doc in docs:
    alone = run_maxgemma(cfg, params, doc[None])[0]
    np.testing.assert_allclose(packed[start:start + len(doc)], alone, rtol=1e-5, atol=1e-5)
    start += len(doc)


@pytest.mark.parametrize("policy", ["none", "full"])  # every policy vs none: below
def test_scanned_equals_unrolled_with_gradients(policy):
  cfg = get_preset("tiny_gemma2", dtype="float32", remat_policy=policy)
  params = random_params(cfg, seed=7)
  tokens = jnp.asarray(np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 16)))

  def loss(p, scan):
    logits = Transformer(cfg.replace(scan_layers=scan)).apply({"params": p}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # op by op it takes ~30 s
  l_unrolled, g_unrolled = grad(params, False)
  l_scan, g_scan = grad(stack_layers(params), True)
  np.testing.assert_allclose(l_scan, l_unrolled, rtol=1e-6)
  g_scan = unstack_layers(g_scan)
  for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_unrolled), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def _remat_case(policy, names=""):
  """(loss fn, scanned params) of tiny_gemma2 in float32 on two packed rows, under `policy`
  (and `remat_names` for the "names" policy)."""
  cfg = get_preset("tiny_gemma2", dtype="float32", remat_policy=policy, remat_names=names)
  params = stack_layers(random_params(cfg, seed=3))
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 16)))
  segments = jnp.asarray(np.repeat([[1] * 10 + [2] * 6], 2, 0))  # 10 > window 8

  def loss(p):
    logits = Transformer(cfg).apply({"params": p}, tokens, None, segments)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 1])

  return loss, params


def _saved_residuals(loss, params) -> int:
  """How many values the backward pass keeps from the forward (jax's own listing)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(loss, params)
  return len(out.getvalue().strip().splitlines())


@pytest.fixture(scope="module")
def no_remat():
  loss, params = _remat_case("none")
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return value, grads, _saved_residuals(loss, params)


# Every policy; "names" with every action on some tag (the rest recomputed).
REMAT_CASES = [(p, "") for p in REMAT_POLICIES if p not in ("none", "names")] + [
    ("names", "qkv_proj:save,attn_out:offload,mlp_out:offload"),
    ("names", "attn_context:offload,mlp_out:save,qkv_proj:recompute")]


@pytest.mark.parametrize("policy,names", REMAT_CASES)
def test_remat_policy_equals_none(policy, names, no_remat):
  """Each remat policy gives the loss and gradients of no remat, and really is a different
  program: its backward pass keeps fewer forward values than `none` does."""
  want_loss, want_grads, none_saved = no_remat
  loss, params = _remat_case(policy, names)
  saved = _saved_residuals(loss, params)
  assert saved < none_saved, f"remat_policy={policy} saves {saved} residuals, none {none_saved}"
  got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  flat_got = jax.tree_util.tree_leaves_with_path(got_grads)
  for (path, g), w in zip(flat_got, jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max(),
                               err_msg=f"{policy}: d loss / d {jax.tree_util.keystr(path)}")


def test_remat_names_keeps_what_it_names_and_refuses_bad_entries():
  """The "names" policy keeps (saves or offloads) the tags it names and recomputes the rest;
  that offloaded tags land in host memory is checked by the TPU compile in
  test_attention_kernels.py. A bad entry is one line naming the key."""
  def saved(names):
    return _saved_residuals(*_remat_case("names", names))

  recomputed = saved("")
  assert saved("attn_out:save,mlp_out:save") > recomputed
  assert saved("attn_out:offload,mlp_out:offload") > recomputed
  for bad in ("attn_out:keep", "q:save"):
    with pytest.raises(ValueError, match=f"model.remat_names: '{bad}' is not name:action"):
      get_preset("tiny_gemma2", remat_policy="names", remat_names=bad)
  with pytest.raises(ValueError, match="model.remat_names='mlp_out:save' is read by "
                     "model.remat_policy=names only"):
    get_preset("tiny_gemma2", remat_policy="full", remat_names="mlp_out:save")


def test_stack_unstack_round_trip_and_init_tree():
  cfg = get_preset("tiny_gemma2")
  v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  specs = nn.get_partition_spec(v)["params"]
  assert tuple(specs["layers"]["attn"]["q_einsum"]["w"]) == ("layers", "heads", "embed", "head_dim")
  assert tuple(specs["embedder"]["input_embedding"]) == ("vocab", "embed")
  params = nn.unbox(v)["params"]
  round_trip = stack_layers(unstack_layers(params))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(round_trip), strict=True):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_stays_close_to_float32():
  cfg = get_preset("tiny_gemma2", dtype="float32")
  params = random_params(cfg, seed=9)
  tokens = np.random.default_rng(10).integers(0, cfg.vocab_size, (2, 16))
  ref = run_maxgemma(cfg, params, tokens)
  bf16 = run_maxgemma(cfg.replace(dtype="bfloat16"), params, tokens)
  assert bf16.dtype == np.float32  # logits always come back in float32
  assert 0 < rel_err(bf16, ref) < 0.05


def test_flops_match_xla_count_of_the_forward_pass():
  """XLA counts the full L x L score matrix; our formula with the window ignored counts half."""
  cfg = get_preset("tiny_gemma1_mqa", dtype="float32", scan_layers=False)
  B, L = 2, 64
  params = random_params(cfg)
  fn = lambda p, t: Transformer(cfg).apply({"params": p}, t)
  compiled = jax.jit(fn).lower(params, jnp.zeros((B, L), jnp.int32)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla = cost["flops"]
  # Ours counts the causal half (L + 1) / 2 of the L keys that the dense einsum computes.
  ours_dense_attention = (flops.flops_per_token(cfg, L, training=False)
                          + 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers * (L - (L + 1) / 2))
  matmul_only = ours_dense_attention * B * L
  # XLA also counts elementwise work (norms, softmax, GELU): a few percent on top.
  assert matmul_only <= xla <= 1.15 * matmul_only, (xla, matmul_only)


def test_flops_window_and_causal_accounting():
  cfg = get_preset("tiny_gemma2")
  L = 64
  # Brute force: count allowed (query, key) pairs of each layer's real mask.
  i = np.arange(L)
  pairs = 0
  for window in cfg.layer_windows():
    allowed = (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :]) < (window or L + 1))
    pairs += allowed.sum()
  attention = 12 * cfg.num_heads * cfg.head_dim * pairs / L
  dense = 6 * (count_params(jax.eval_shape(
      Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
      - 2 * cfg.d_model * cfg.num_layers * 2 - cfg.d_model)  # minus the norm scales
  assert flops.flops_per_token(cfg, L) == pytest.approx(dense + attention, rel=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_kv_heads=3), "num_heads (4) must be divisible by model.num_kv_heads"),
    (dict(sliding_window=1024), "sliding_window (1024) is larger than the context"),
    (dict(remat_policy="sometimes"), "allowed values: none, full"),
    (dict(dtype="float8"), "model.dtype is 'float8'; allowed values"),
    (dict(attention_pattern=("local", "glob")), "attention_pattern must be"),
])
def test_invalid_config_errors(kwargs, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    get_preset("tiny_gemma2", **kwargs)


def test_unknown_preset_and_field_errors():
  with pytest.raises(ValueError, match="unknown model preset 'gemma2_2bb'.*Did you mean gemma2_2b"):
    get_preset("gemma2_2bb")
  with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['d_modle'\]"):
    get_preset("tiny_gemma2", d_modle=3)


@pytest.mark.parametrize("tokens, kwargs, message", [
    (np.zeros((2, 8, 1), np.int32), {}, "tokens must be \\[batch, length\\] integers"),
    (np.zeros((2, 8), np.float32), {}, "tokens must be integers"),
    (np.zeros((2, 8), np.int32), {"segment_ids": np.ones((2, 7), np.int32)},
     "segment_ids must have the shape of tokens \\(2, 8\\), got \\(2, 7\\)"),
    (np.zeros((2, 8), np.int32), {"positions": np.ones((8,), np.int32)},
     "positions must have the shape of tokens"),
])
def test_bad_inputs_get_clear_errors(tokens, kwargs, message):
  cfg = get_preset("tiny_gemma1_mqa", dtype="float32")
  params = stack_layers(random_params(cfg))
  with pytest.raises(ValueError, match=message):
    Transformer(cfg).apply({"params": params}, jnp.asarray(tokens),
                           **{k: jnp.asarray(v) for k, v in kwargs.items()})


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("BLD,DF->BLF", (2, 3, 4), (4, 5)),
    ("BLD,VD->BLV", (2, 3, 4), (6, 4)),
    ("BSD,CKDH->CBSKH", (2, 3, 4), (2, 3, 4, 5)),
    ("BLNH,NHD->BLD", (2, 3, 4, 5), (4, 5, 6)),
    ("LD,DF->LF", (3, 4), (4, 5)),
])
def test_flattened_einsum_equals_einsum_with_gradients(spec, x_shape, w_shape):
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  ours = lambda x, w: jnp.sum(jnp.sin(layers.einsum(spec, x, w)))
  ref = lambda x, w: jnp.sum(jnp.sin(jnp.einsum(spec, x, w)))
  np.testing.assert_allclose(layers.einsum(spec, x, w), jnp.einsum(spec, x, w), rtol=1e-6,
                             atol=1e-6)
  for g, r in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_flatten_matmuls_computes_the_same_model():
  cfg = get_preset("tiny_gemma2", dtype="float32")
  params = random_params(cfg)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
  ref = run_maxgemma(cfg, params, tokens)
  assert rel_err(run_maxgemma(cfg.replace(flatten_matmuls=True), params, tokens), ref) < 1e-6
