"""Different mesh layouts give the same loss, step for step (float32, identical data).

Each layout runs the trainer's own setup (`trainer.build`: state creation and the jitted train
step) on the 8 fake CPU devices that tests/conftest.py provides.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from maxgemma import checkpoint, sharding
from maxgemma import config as config_lib
from maxgemma.trainer.build import build
from maxgemma.trainer.objective import NextToken

TOLERANCE = 1e-5  # relative, on each step's loss
STEPS = 3


def make_config(preset="tiny_gemma2", **mesh):
  cfg = config_lib.base_config()
  cfg.model.preset = preset
  cfg.model.dtype = "float32"
  cfg.train.global_batch = 16
  cfg.train.seq_len = 32
  cfg.optim.warmup_steps = 0
  cfg.optim.learning_rate = 1e-2
  cfg.mesh.ici_data = 1
  for key, value in mesh.items():
    cfg.mesh[key] = value
  return cfg


def synthetic_batches(cfg, steps, vocab):
  """The same batch every step, so the loss must fall."""
  B, L = cfg.train.global_batch, cfg.train.seq_len
  for _ in range(steps):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (B, L + 1)).astype(np.int32)
    seg = np.ones((B, L), np.int32)
    seg[:, L // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(L // 2), np.arange(L - L // 2)])[None].repeat(B, 0)
    yield {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos.astype(np.int32),
           "segment_ids": seg, "loss_weights": np.ones((B, L), np.float32)}


def run_losses(cfg, devices, steps=STEPS):
  mesh = sharding.make_mesh(cfg.mesh, devices)
  setup = build(cfg, mesh)
  state = setup.create_state(seed=0)
  frozen = setup.load_frozen()
  losses = []
  rows = cfg.train.global_batch // jax.process_count()  # this process's share of every batch
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  with setup.scope():
    for batch in synthetic_batches(cfg, steps, setup.model_cfg.vocab_size):
      local = {k: v[mine] for k, v in batch.items()}
      state, metrics = setup.train_step(state, sharding.global_batch(local, mesh), frozen)
      losses.append(float(metrics["loss"]))
  return np.array(losses), state


@pytest.fixture(scope="module")
def reference():
  return run_losses(make_config(), jax.devices()[:1])[0]


LAYOUTS = {  # pure data parallelism (data 8) is the gradient-accumulation test's layout
    "data2_tensor4": dict(ici_data=2, ici_tensor=4),
    "fsdp8": dict(ici_fsdp=8),
    "dcn2_x_data2_tensor2": dict(dcn_data=2, ici_data=2, ici_tensor=2),
    "fsdp4_tensor2_params_replicated": dict(ici_fsdp=4, ici_tensor=2, shard_params=False),
    # Sequence parallelism: activations split along the length (tiny_gemma2: sliding windows of
    # 8 and global layers, soft-caps, two packed documents per row), keys and values gathered.
    "sequence2_fsdp2_tensor2": dict(ici_sequence=2, ici_fsdp=2, ici_tensor=2),
    "sequence4_data2": dict(ici_sequence=4, ici_data=2),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_loss_on_every_layout(reference, layout):
  losses, _ = run_losses(make_config(**LAYOUTS[layout]), jax.devices())
  assert np.all(np.diff(reference) < 0), reference  # really training
  np.testing.assert_allclose(losses, reference, rtol=TOLERANCE)


def test_gradient_accumulation_equals_one_big_batch(reference):
  cfg = make_config(ici_data=8)
  cfg.optim.grad_accum_steps = 4
  losses, _ = run_losses(cfg, jax.devices())
  np.testing.assert_allclose(losses, reference, rtol=TOLERANCE)


def test_optimizer_state_kept_in_host_memory_trains_alike(reference, tmp_path):
  """optim.offload_state: the Adam moments live in pinned host memory between steps (the step
  brings them in and sends them back), the losses are one device's, and a checkpoint of the
  state restores into host memory with the same values."""
  cfg = make_config(ici_fsdp=8)
  cfg.optim.offload_state = True
  losses, state = run_losses(cfg, jax.devices())
  np.testing.assert_allclose(losses, reference, rtol=TOLERANCE)

  def kinds(tree):
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}
  assert kinds(state["opt_state"]) == {"pinned_host"}
  assert kinds(state["params"]) == {"device"}
  setup = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()))
  ckpt = checkpoint.Checkpointer(str(tmp_path), cfg.checkpoint)
  ckpt.save(STEPS, state)
  ckpt.wait()
  restored = ckpt.restore(STEPS, setup.abstract_state, setup.shardings)
  ckpt.close()
  assert kinds(restored["opt_state"]) == {"pinned_host"}
  for a, b in zip(jax.tree.leaves(restored["opt_state"]), jax.tree.leaves(state["opt_state"]),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_host_memory_offload_is_refused_on_devices_without_it():
  """Offloading the optimizer state or activations to devices without pinned host memory: one
  line naming the key."""
  from types import SimpleNamespace

  from maxgemma.model.config import ModelConfig
  from maxgemma.trainer import build as build_lib
  device = SimpleNamespace(platform="gpu",
                           addressable_memories=lambda: [SimpleNamespace(kind="device")])
  mesh = SimpleNamespace(devices=np.array([device], dtype=object))
  model_cfg = config_lib.model_config(make_config())
  build_lib._check_host_memory(model_cfg, False, mesh)  # nothing offloaded: nothing to refuse
  with pytest.raises(ValueError, match=r"config\.optim\.offload_state=True .* gpu devices have "
                     r"none \(memories: device\); set config\.optim\.offload_state=False"):
    build_lib._check_host_memory(model_cfg, True, mesh)
  offloading = ModelConfig(**{**model_cfg.__dict__, "remat_policy": "offload_names"})
  with pytest.raises(ValueError, match=r"config\.model\.remat_policy=offload_names"):
    build_lib._check_host_memory(offloading, False, mesh)


def test_leaves_are_sharded_as_the_rules_say():
  cfg = make_config(ici_fsdp=2, ici_tensor=4)
  _, state = run_losses(cfg, jax.devices(), steps=1)
  params = state["params"]
  spec = lambda x: tuple(x.sharding.spec)
  assert spec(params["embedder"]["input_embedding"]) == ("tensor", "fsdp")
  assert spec(params["layers"]["attn"]["q_einsum"]["w"]) == (None, "tensor", "fsdp", None)
  # kv_heads (2) do not divide tensor (4): that dimension stays replicated, embed still fsdp.
  assert spec(params["layers"]["attn"]["kv_einsum"]["w"]) == (None, None, None, "fsdp", None)
  assert spec(params["layers"]["mlp"]["linear"]) == (None, "tensor", "fsdp")
  moments = [x for path, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])
             if "['layers']['mlp']['linear']" in jax.tree_util.keystr(path)]
  assert len(moments) == 2  # Adam's mu and nu mirror the parameter and its sharding
  assert all(spec(m) == (None, "tensor", "fsdp") for m in moments)


def test_state_over_sequence_splits_embed_over_fsdp_and_sequence(reference):
  """`mesh.shard_state_over_sequence`: the state's embed dimension spans fsdp x sequence, the
  losses stay those of one device."""
  cfg = make_config(ici_sequence=2, ici_fsdp=2, ici_tensor=2, shard_state_over_sequence=True)
  losses, state = run_losses(cfg, jax.devices())
  np.testing.assert_allclose(losses, reference, rtol=TOLERANCE)
  params, both = state["params"], ("fsdp", "sequence")
  spec = lambda x: tuple(x.sharding.spec)
  assert spec(params["embedder"]["input_embedding"]) == ("tensor", both)
  assert spec(params["layers"]["mlp"]["linear"]) == (None, "tensor", both)
  moments = [x for path, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])
             if "['layers']['mlp']['linear']" in jax.tree_util.keystr(path)]
  assert len(moments) == 2 and all(spec(m) == (None, "tensor", both) for m in moments)


def test_a_dimension_keeps_the_leading_axes_that_divide_it():
  mesh = sharding.make_mesh(make_config(ici_fsdp=2, ici_sequence=4).mesh, jax.devices())
  rules = sharding.rules_for(make_config(shard_state_over_sequence=True).mesh)
  spec = lambda embed: tuple(sharding.mesh_spec(("vocab", "embed"), (64, embed), mesh, rules))
  assert spec(16) == (None, ("fsdp", "sequence"))  # 16 divides by fsdp x sequence 8
  assert spec(6) == (None, "fsdp")  # 6 divides by fsdp 2, not by fsdp x sequence 8
  assert spec(3) == (None, None)


def test_mesh_errors_are_clear():
  cfg = make_config(ici_data=3)
  with pytest.raises(ValueError, match="has 3 devices but 8 are available"):
    sharding.make_mesh(cfg.mesh, jax.devices())
  cfg = make_config(ici_data=-1, ici_tensor=-1)
  with pytest.raises(ValueError, match="at most one mesh.ici_\\* axis may be -1"):
    sharding.make_mesh(cfg.mesh, jax.devices())


def test_sequence_axis_must_divide_the_length():
  cfg = make_config(ici_sequence=8)
  cfg.train.seq_len = 36
  with pytest.raises(ValueError, match=r"train.seq_len \(36\) must be divisible by the sequence "
                                       r"axis 8 \(mesh.ici_sequence x mesh.dcn_sequence\)"):
    build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()))
  # Splash: the query tiles tile one shard's 64 queries, not the whole 256.
  cfg = make_config(ici_sequence=4, ici_data=2)
  cfg.train.seq_len = 256
  config_lib.use_splash(cfg.model, 128)
  with pytest.raises(ValueError, match="model.splash_block_q=128 does not divide one sequence "
                                       "shard's 64 queries"):
    build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()))


def test_residual_shards_must_divide_the_length():
  # Sharded residuals split the length over sequence x tensor: 34 positions over tensor 4 would
  # be padded shards; refused in one line naming the keys (sequence 1 divides it).
  cfg = make_config(ici_tensor=4, ici_data=2)
  cfg.train.seq_len = 34
  with pytest.raises(ValueError, match=r"mesh.shard_residuals splits the residual stream's "
                                       r"act_residual_length \(train.seq_len=34\) over tensor = 4"):
    build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()))


def test_two_real_processes_give_the_same_loss(reference, tmp_path):
  """2 processes x 4 devices joined by jax.distributed (gloo on localhost), data 8."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "losses.json"
  result = subprocess.run(
      [sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=4",
       f"--log_dir={tmp_path}", "--timeout=300", "--module=tests.parallel_probe", "--", str(out)],
      cwd=root, env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True,
      timeout=360)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  np.testing.assert_allclose(json.loads(out.read_text()), reference, rtol=TOLERANCE)


def test_refuses_a_large_leaf_left_replicated():
  # 16,385 vocabulary rows divide no tensor axis, and fsdp is 1: the embedding would be copied
  # whole onto every device.
  cfg = make_config("tiny_gemma1_mqa", ici_tensor=8)
  cfg.model.vocab_size = 16_385
  mesh = sharding.make_mesh(cfg.mesh, jax.devices())
  with pytest.raises(ValueError, match=r"parameter leaf \['embedder'\]\['input_embedding'\] "
                                       r"\(16385, 64\) would be fully replicated"):
    build(cfg, mesh)


class _WithTeacher(NextToken):
  """Next-token loss with a frozen second copy of the model's parameters (as distillation has)."""

  def frozen_abstract(self):
    return {"teacher": self.abstract_params()}


def test_frozen_inputs_are_sharded_by_the_parameter_rules():
  cfg = make_config(ici_fsdp=2, ici_tensor=4)
  setup = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()),
                _WithTeacher(config_lib.model_config(cfg)))
  _, _, frozen = setup.abstract_args(cfg.train.global_batch, cfg.train.seq_len)
  teacher = frozen["teacher"]
  spec = lambda x: tuple(x.sharding.spec)
  assert spec(teacher["embedder"]["input_embedding"]) == ("tensor", "fsdp")
  assert spec(teacher["layers"]["mlp"]["linear"]) == (None, "tensor", "fsdp")

CHAIN = ("make_train_step", "make_eval_step", "state_shardings", "frozen_shardings")
BUILDERS = ("maxgemma/trainer/loop.py", "maxgemma/aot.py", "benchmarks/train_throughput.py",
            "tests/test_parallelism.py")


def _calls(path: Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Call):
      f = node.func
      names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
  return names


def test_the_step_is_wired_in_one_place():
  """Only trainer/build.py calls the chain's pieces; the loop, the AOT compile, the benchmark and
  these tests get their step from `build`."""
  root = Path(__file__).resolve().parents[1]
  files = [*root.glob("maxgemma/**/*.py"), *root.glob("benchmarks/*.py"), *root.glob("tests/*.py")]
  wiring = {str(f.relative_to(root)): sorted(_calls(f) & set(CHAIN)) for f in files}
  wiring = {f: names for f, names in wiring.items() if names}
  assert set(wiring) == {"maxgemma/trainer/build.py"}, f"the step is wired outside build: {wiring}"
  for name in BUILDERS:
    assert "build" in _calls(root / name), f"{name} no longer calls trainer.build.build"
