"""Every attention implementation equals the "xla" reference on the inputs it supports.

"dot_product" runs here through jax.nn.dot_product_attention's XLA path; its cuDNN flash path runs
only when a GPU is present (skipped otherwise). "splash" runs here in Pallas interpret mode (the
same kernel code, interpreted on CPU); on a TPU it is compiled (see also the AOT test).
"""

import ast
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from maxgemma import sharding
from maxgemma.model import attention_kernels, attention_reference, presets
from maxgemma.model.attention_reference import GLOBAL_WINDOW
from maxgemma.model.gemma import Transformer

HAS_GPU = any(d.platform == "gpu" for d in jax.devices()) if jax.default_backend() == "gpu" \
    else False
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no GPU lent to this run")


def _inputs(B=2, L=256, N=4, K=2, H=64, dtype=jnp.float32, seed=0, packed=True):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, L, N, H), dtype) * H ** -0.5
  k = jax.random.normal(ks[1], (B, L, K, H), dtype)
  v = jax.random.normal(ks[2], (B, L, K, H), dtype)
  seg = np.ones((B, L), np.int32)
  if packed:  # uneven packed documents, and padding (segment 0) at the end of row 0
    seg[:, L // 3:] = 2
    seg[1, 3 * L // 4:] = 3
    seg[0, L - 16:] = 0
  return q, k, v, jnp.asarray(seg)


def _reference(q, k, v, seg, window, softcap):
  B, L = seg.shape
  idx = jnp.broadcast_to(jnp.arange(L), (B, L))
  mask = attention_reference.attention_mask(idx, idx, seg, seg, window)
  return attention_reference.masked_attention(q, k, v, mask, softcap=softcap)


CASES = {  # name: (N, K, window, softcap)
    "causal_gqa": (4, 2, GLOBAL_WINDOW, None),
    "causal_mqa": (4, 1, GLOBAL_WINDOW, None),
    "causal_mha": (2, 2, GLOBAL_WINDOW, None),
    "window_gqa": (4, 2, 48, None),
    "softcap_window": (4, 2, 48, 50.0),
    "softcap_causal_mqa": (4, 1, GLOBAL_WINDOW, 30.0),
}
# jax.nn.dot_product_attention has no soft-cap: those cases are checked as a fallback instead.
KERNEL_CASES = [(impl, case) for impl in ("dot_product", "splash") for case in CASES
                if not (impl == "dot_product" and CASES[case][3] is not None)]


@pytest.mark.parametrize("impl,case", KERNEL_CASES)
def test_impl_equals_reference(impl, case):
  N, K, window, softcap = CASES[case]
  q, k, v, seg = _inputs(N=N, K=K)
  expected = _reference(q, k, v, seg, window, softcap)
  got = attention_kernels.attend(q, k, v, impl=impl, segment_ids_BL=seg, window=window,
                                 softcap=softcap, interpret=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][3] is not None])
def test_dot_product_softcap_falls_back(case, caplog, monkeypatch):
  """With a soft-cap, "dot_product" never calls jax.nn.dot_product_attention (which would drop
  the cap) and says so; the result is the capped reference, not the uncapped one."""
  N, K, window, softcap = CASES[case]
  q, k, v, seg = _inputs(N=N, K=K)
  uncapped = _reference(q, k, v, seg, window, None)

  def refuse(*args, **kwargs):
    raise AssertionError("jax.nn.dot_product_attention called with a soft-cap")

  monkeypatch.setattr(attention_kernels, "_logged", set())
  monkeypatch.setattr(jax.nn, "dot_product_attention", refuse)
  with caplog.at_level("WARNING"):
    got = attention_kernels.attend(q, k, v, impl="dot_product", segment_ids_BL=seg,
                                   window=window, softcap=softcap)
  assert "no logit soft-capping" in caplog.text
  np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(q, k, v, seg, window,
                                                                    softcap)), atol=1e-6)
  assert np.abs(np.asarray(got) - np.asarray(uncapped)).max() > 1e-4  # the cap is applied


@pytest.mark.parametrize("impl", ["dot_product", "splash"])
def test_gradients_equal_reference(impl):
  q, k, v, seg = _inputs(B=2, L=256, N=4, K=1)
  window = 64
  cot = jax.random.normal(jax.random.key(7), q.shape)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

  ref = jax.grad(loss(lambda q, k, v: _reference(q, k, v, seg, window, None)),
                 argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(lambda q, k, v: attention_kernels.attend(
      q, k, v, impl=impl, segment_ids_BL=seg, window=window, interpret=True)),
      argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, ref, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["dot_product", "splash"])
def test_traced_window_switch(impl):
  """A traced per-layer window (the scan's) picks the matching static branch."""
  q, k, v, seg = _inputs(L=128)
  windows = (32, GLOBAL_WINDOW)
  fn = jax.jit(lambda w: attention_kernels.attend(q, k, v, impl=impl, segment_ids_BL=seg,
                                                  window=w, windows=windows, interpret=True))
  for w in windows:
    expected = _reference(q, k, v, seg, w, None)
    np.testing.assert_allclose(np.asarray(fn(jnp.int32(w))), np.asarray(expected), atol=2e-5)


def test_splash_off_tpu_falls_back(caplog):
  """Without interpret mode off a TPU, splash logs why and computes the reference."""
  q, k, v, seg = _inputs(L=128)
  with caplog.at_level("WARNING"):
    got = attention_kernels.attend(q, k, v, impl="splash", segment_ids_BL=seg,
                                   window=GLOBAL_WINDOW)
  np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(q, k, v, seg, GLOBAL_WINDOW,
                                                                    None)),
                             atol=1e-6)
  assert "TPU only" in caplog.text or jax.default_backend() == "tpu"


@pytest.mark.parametrize("impl", ["dot_product"])
@pytest.mark.parametrize("preset,scan", [("tiny_gemma3", True), ("tiny_gemma1_mqa", False)])
def test_model_logits_equal_reference(impl, preset, scan):
  """The whole model with a kernel impl (scanned: traced windows; unrolled: static) equals xla."""
  cfg = presets.get_preset(preset, dtype="float32", scan_layers=scan)
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
  seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 12], 2, 0), jnp.int32)
  pos = jnp.asarray(np.repeat([list(range(20)) + list(range(12))], 2, 0), jnp.int32)
  params = jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens)["params"]
  ref = jax.jit(Transformer(cfg).apply)({"params": params}, tokens, pos, seg)
  got = jax.jit(Transformer(cfg.replace(attention_impl=impl)).apply)({"params": params}, tokens,
                                                                      pos, seg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4, rtol=1e-4)


def _mesh(data, fsdp, tensor):
  devices = np.array(jax.devices()[:data * fsdp * tensor]).reshape(data, fsdp, tensor)
  return jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("shape,expected", [
    ((4, 128, 4, 64), P(("data", "fsdp"), None, "tensor", None)),
    ((2, 128, 4, 64), P(None, None, "tensor", None)),  # batch 2 does not split 4 ways
    ((4, 128, 3, 64), P(("data", "fsdp"), None, None, None)),  # 3 heads do not split 2 ways
])
def test_splash_specs_follow_the_rules(shape, expected):
  """The splash shard_map specs are the rules' act_batch / act_heads axes, as far as they fit."""
  mesh = _mesh(2, 2, 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    got = attention_kernels.shard_spec(("act_batch", None, "act_heads", None), shape, mesh)
  assert got == expected
  with jax.set_mesh(_mesh(2, 1, 1)), nn.logical_axis_rules(sharding.RULES):
    got = attention_kernels.shard_spec(("act_batch", None, "act_heads", None), shape,
                                       _mesh(2, 1, 1))
  assert got == P("data", None, None, None)  # size-1 axes dropped


@pytest.mark.parametrize("K", [2, 1])
def test_splash_sharded_equals_reference(K):
  """Splash (interpret mode) in its shard_map over a data x fsdp x tensor mesh, key/value heads
  split (K=2) or repeated (K=1), equals the reference."""
  q, k, v, seg = _inputs(B=4, L=128, N=4, K=K)
  mesh = _mesh(2, 2, 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    got = jax.jit(lambda q, k, v, s: attention_kernels.attend(
        q, k, v, impl="splash", segment_ids_BL=s, window=48, interpret=True))(q, k, v, seg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(q, k, v, seg, 48, None)),
                             atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [GLOBAL_WINDOW, 48])
def test_splash_sequence_parallel_equals_reference(window):
  """Sequence parallelism (data 2 x sequence 2 x tensor 2): each shard's 128 queries against the
  gathered 256 keys, the kernel's mask tables split along the query blocks; the output and the
  gradients (dq, dk, dv kernels) equal the reference's."""
  q, k, v, seg = _inputs(B=2, L=256, N=4, K=2)
  devices = np.array(jax.devices()[:8]).reshape(2, 1, 2, 2)
  mesh = jax.sharding.Mesh(devices, sharding.MESH_AXES)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * jnp.cos(jnp.arange(64.0)))
  splash = lambda q, k, v: attention_kernels.attend(q, k, v, impl="splash", segment_ids_BL=seg,
                                                    window=window, interpret=True)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    assert attention_kernels.shard_spec(("act_batch", "act_length", "act_heads", None),
                                        q.shape, mesh) == P("data", "sequence", "tensor", None)
    got = jax.jit(jax.value_and_grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
  want = jax.value_and_grad(loss(lambda q, k, v: _reference(q, k, v, seg, window, None)),
                            argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=5e-5)


@pytest.mark.slow
def test_sequence_parallel_splash_compiles_for_tpu():
  """Gemma 3 (sliding-window and global layers) with splash on v5e:2x2 as sequence 2 x fsdp 2:
  the Mosaic kernels are in the program, run on 256 of the 512 queries per chip, and the keys
  and values of the whole length are all-gathered over the sequence pairs."""
  from maxgemma import aot
  from maxgemma.config import base_config, use_splash

  c = base_config()
  c.model.preset = "tiny_gemma3"
  c.model.update(head_dim=128, sliding_window=128, max_seq_len=512)
  use_splash(c.model, 128)
  c.train.update(global_batch=4, seq_len=512)
  c.mesh.update(ici_data=1, ici_fsdp=2, ici_sequence=2)
  report = aot.compile_train_step(c, "v5e:2x2", 1, keep_compiled=True)
  hlo = report["compiled"].as_text()
  assert report["mesh"]["sequence"] == 2 and report["fits"]
  # Forward kernels output [rows 4 / fsdp 2, heads 4, queries 512 / sequence 2, head_dim 128].
  forward = [ln for ln in hlo.splitlines() if "splash_mha_fwd" in ln and "custom-call(" in ln]
  assert forward and all("bf16[2,4,256,128]" in ln.split("custom-call(")[0] for ln in forward)
  # Keys (or values) [2 rows, all 512 positions, 2 kv heads, 128] gathered over `sequence`.
  gathered = [ln for ln in hlo.splitlines() if "= bf16[2,512,2,128]" in ln and "all-gather(" in ln]
  assert gathered, "no all-gather of the keys and values over the sequence axis"


MODEL_DIR = pathlib.Path(attention_kernels.__file__).parent


def test_model_names_no_mesh_axis():
  """No string literal under maxgemma/model/ is a mesh-axis name: the model speaks logical axes."""
  found = [f"{path.name}:{node.lineno} {node.value!r}" for path in sorted(MODEL_DIR.glob("*.py"))
           for node in ast.walk(ast.parse(path.read_text()))
           if isinstance(node, ast.Constant) and node.value in sharding.MESH_AXES]
  assert not found, f"mesh-axis names in the model: {found}; use logical axes and the rules"


def test_every_rule_is_used_by_the_model():
  """Each logical axis of sharding.RULES is named somewhere under maxgemma/model/ (or by the
  LoRA adapters, maxgemma/lora.py, which annotate their own parameters)."""
  paths = [*MODEL_DIR.glob("*.py"), MODEL_DIR.parent / "lora.py"]
  literals = {node.value for path in paths
              for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)}
  unused = [name for name, _ in sharding.RULES if name not in literals]
  assert not unused, f"sharding.RULES rows no model code names: {unused}; drop them"


def test_model_imports_form_no_cycle():
  """The modules of maxgemma/model/ import each other in one direction only."""
  names = {p.stem for p in MODEL_DIR.glob("*.py")}
  graph = {}
  for path in MODEL_DIR.glob("*.py"):
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == "maxgemma.model":
        deps |= {a.name for a in node.names if a.name in names}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("maxgemma.model."):
        deps.add(node.module.rsplit(".", 1)[1])
    graph[path.stem] = deps
  done, active = set(), []

  def visit(name):
    if name in active:
      raise AssertionError(f"import cycle: {' -> '.join(active[active.index(name):] + [name])}")
    if name not in done:
      active.append(name)
      for dep in graph.get(name, ()):
        visit(dep)
      active.pop()
      done.add(name)

  for name in graph:
    visit(name)


@needs_gpu
@pytest.mark.parametrize("case", ["causal_gqa", "causal_mqa", "window_gqa"])
def test_cudnn_flash_equals_reference(case):
  """cuDNN flash attention (bf16) against the float32 reference on the same bf16 inputs."""
  N, K, window, _ = CASES[case]
  q, k, v, seg = _inputs(N=N, K=K, L=512, H=128, dtype=jnp.bfloat16)
  assert attention_kernels.dot_product_backend(q.dtype) == "cudnn"
  expected = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), seg, window, None)
  got = jax.jit(lambda q, k, v: attention_kernels.attend(
      q, k, v, impl="dot_product", segment_ids_BL=seg, window=window))(q, k, v)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected), atol=2e-2,
                             rtol=2e-2)


@pytest.mark.slow
def test_splash_and_offload_compile_for_tpu():
  """The train step with splash attention (Gemma 2 local/global windows via the switch, soft-caps,
  heads split over `tensor`) and per-name remat (saved and host-offloaded tags) compiles for a
  v5e slice through `maxgemma.aot`'s AOT path: the Mosaic kernels and the host-memory buffers
  are in the HLO."""
  from maxgemma import aot
  from maxgemma.config import base_config

  c = base_config()
  c.model.preset = "tiny_gemma2"
  c.model.update(head_dim=128, sliding_window=128, max_seq_len=512, attention_impl="splash",
                 remat_policy="names", remat_names="qkv_proj:save,attn_out:offload,mlp_out:offload")
  c.train.update(global_batch=8, seq_len=256)
  c.mesh.update(ici_data=1, ici_fsdp=2, ici_tensor=2)
  report = aot.compile_train_step(c, "v5e:2x2", 1, keep_compiled=True)
  hlo = report["compiled"].as_text()
  assert "tpu_custom_call" in hlo  # the splash kernels (forward, dq, dkv)
  assert "S(5)" in hlo  # buffers in host memory space: the offloaded activations
  assert report["fits"]
