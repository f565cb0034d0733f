"""Ahead-of-time compiles of the real train step for TPU topologies (libtpu, no TPU needed).

A tiny model on small v5e topologies: per-chip memory from the TPU compiler, the one-line refusal
of a step too big for HBM, and the hierarchical cross-slice gradient reduction read from the
compiled HLO.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from maxgemma import aot, hlo
from maxgemma.config import base_config, model_config
from maxgemma.model import flops

ROOT = Path(__file__).resolve().parents[1]
SLICE = "v5e:2x2"  # 4 chips per slice
ICI_FSDP = 4


def tiny_config(batch=16, slices=2):
  c = base_config()
  c.model.preset = "tiny_gemma1_mha"
  c.train.global_batch = batch
  c.train.seq_len = 64
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = ICI_FSDP
  c.mesh.dcn_data = slices
  return c


@pytest.fixture(scope="module")
def two_slices():
  """The tiny model's step compiled for 2 slices of v5e:2x2: data over DCN, ZeRO-3 in a slice."""
  return aot.compile_train_step(tiny_config(), SLICE, 2, keep_compiled=True)


def shard_bytes(x):
  return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def test_memory_analysis_is_present_and_sane(two_slices):
  r = two_slices
  assert (r["chips"], r["num_slices"], r["mesh"]) == (8, 2, {"data": 2, "fsdp": 4, "sequence": 1,
                                                  "tensor": 1})
  m = r["memory"]
  state = r["state"]
  state_bytes = sum(shard_bytes(x) for x in jax.tree.leaves(state))
  full_state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  # Each chip holds its shard of params + Adam moments (the TPU layout pads, never shrinks).
  assert state_bytes < full_state_bytes / 3
  assert m["argument_bytes"] >= state_bytes
  # The state is donated: its output buffers alias the inputs.
  assert state_bytes <= m["alias_bytes"] <= min(m["argument_bytes"], m["output_bytes"])
  assert 0 < m["peak_bytes"] < m["usable_hbm_bytes"] == int(15.75 * 2**30)
  assert r["fits"]
  tokens = 16 * 64
  want = flops.flops_per_token(model_config(tiny_config()), 64) * tokens
  assert r["model_flops_per_step"] == pytest.approx(want)
  assert r["model_flops_per_chip"] == pytest.approx(want / 8)
  assert r["xla_flops_per_chip_scan_body_once"] > 0
  assert r["roofline_step_s"] == pytest.approx(want / (8 * 197e12))


def test_cross_slice_reduction_is_hierarchical(two_slices):
  """Only each chip's reduce-scattered gradient shard crosses slices, not the full gradient."""
  params = two_slices["state"]["params"]
  sends = hlo.dcn_allreduce_sends(two_slices["compiled"].as_text())
  assert sends, "no cross-slice ALL_REDUCE transfers in a 2-slice program"
  # Each transfer goes between the same chip of the other slice: chips 0..3 of a slice.
  assert all(s["target"].endswith("x{0:3}") for s in sends), {s["target"] for s in sends}
  shard = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(params))
  full = sum(x.size for x in jax.tree.leaves(params))
  assert full == ICI_FSDP * shard  # everything is sharded 4 ways inside a slice
  sent = sum(s["elements"] * s["per_step"] for s in sends)
  # Every gradient element must cross once; a flat (non-hierarchical) all-reduce would send the
  # full gradient, 4x the shard. XLA sends the embedding's two gradient terms (lookup and output
  # projection) separately, hence some slack above 1x.
  assert shard <= sent < 2 * shard, (shard, sent, full)
  # The embedding gradient: its per-chip shard ([V, D / 4]) is what a send carries, produced by
  # the in-slice reduce-scatter.
  emb = params["embedder"]["input_embedding"]
  emb_shard = tuple(emb.sharding.shard_shape(emb.shape))
  assert emb_shard == (emb.shape[0], emb.shape[1] // ICI_FSDP)
  fed = [s for s in sends if hlo.is_reduce_scatter(s["source"])
         and s["source"].array[1] == emb_shard and s["elements"] == math.prod(emb_shard)]
  assert fed, [(s["shape"], s["source"].opcode, s["source"].array) for s in sends]



def test_slice_collectives_and_step_bounds(two_slices):
  """ZeRO-3 over 4 chips: each chip must at least reduce-scatter its float32 gradients inside the
  slice (3/4 of 4 bytes per parameter sent) and gather the parameters it computes with; the
  step bounds are those bytes at the chip's bandwidths."""
  r = two_slices
  params = sum(x.size for x in jax.tree.leaves(r["state"]["params"]))
  ici = r["ici_bytes_per_chip"]
  assert ici == sum(c["sent_bytes"] for c in hlo.ici_collectives(r["compiled"].as_text()))
  assert sum(r["ici_bytes_by_kind"].values()) == ici
  # ZeRO-3 over the slice's 4 chips: the parameters are all-gathered over the 4.
  assert r["ici_bytes_by_kind"].get("all-gather x4", 0) > 0
  assert 3 * params <= ici <= 24 * params, (ici, params)
  b = r["step_bounds_s"]
  assert b["ici"] == pytest.approx(ici / 200e9) and b["compute"] == r["roofline_step_s"]
  assert b["dcn"] == pytest.approx(r["dcn_allreduce_bytes_per_chip"] / (6.4e12 / 8 / 256))
  assert b["overlapped"] == max(b["compute"], b["ici"], b["dcn"])
  assert b["serial"] == pytest.approx(b["compute"] + b["ici"] + b["dcn"])

def test_peak_over_usable_hbm_is_refused(two_slices):
  report = {k: v for k, v in two_slices.items() if k not in ("compiled", "state")}
  aot.check_fits(report)  # fits as compiled
  report["memory"] = dict(report["memory"], usable_hbm_bytes=report["memory"]["peak_bytes"] - 1)
  with pytest.raises(aot.DoesNotFitError, match="exceeds the .* usable HBM"):
    aot.check_fits(report)


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "maxgemma.aot", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


TINY_FLAGS = ("--config=configs/gemma_2b_v5e_1pod.py", "--config.model.preset=tiny_gemma1_mha",
              "--config.train.seq_len=64", "--config.model.attention_impl=xla",
              f"--config.mesh.ici_fsdp={ICI_FSDP}",
              f"--topology={SLICE}")


def test_cli_reports_memory_and_flops(tmp_path):
  out = tmp_path / "report.json"
  p = run_cli(*TINY_FLAGS, "--config.train.global_batch=8", f"--json_out={out}")
  assert p.returncode == 0, p.stderr[-2000:]
  assert "peak" in p.stdout and "of 15.75 GiB usable HBM" in p.stdout, p.stdout
  report = json.loads(out.read_text())
  assert report["mesh"] == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 1}
  assert report["num_slices"] == 1
  assert 0 < report["memory"]["peak_bytes"] < report["memory"]["usable_hbm_bytes"]
  assert "libtpu" not in p.stderr and "TPU_ACCELERATOR_TYPE" not in p.stderr, p.stderr[-2000:]


def test_cli_exits_with_one_line_when_the_step_does_not_fit():
  # 2^20 rows of 64 tokens: the [B, L, V] float32 logits alone need ~34 GiB per chip.
  p = run_cli(*TINY_FLAGS, "--config.train.global_batch=1048576", "--config.train.loss_chunk=0")
  assert p.returncode != 0
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("maxgemma.aot: tiny_gemma1_mha batch 1048576 x seq 64"), p.stderr
  assert "does not fit" in last and "exceeds available HBM (15.75G)" in last, last
  assert "Traceback" not in p.stderr


# Parameters per model in the Gemma report (Gemma Team 2024, Table 2): (embedding, non-embedding).
GEMMA_REPORT_PARAMS = {"gemma1_2b": (524_550_144, 1_981_884_416),
                       "gemma1_7b": (786_825_216, 7_751_248_896)}


@pytest.mark.parametrize("name,preset,pods,ici", [
    ("gemma_7b_v5e_1pod", "gemma1_7b", 1, dict(ici_fsdp=16, ici_tensor=16)),
    ("gemma_7b_v5e_16pods", "gemma1_7b", 16, dict(ici_fsdp=16, ici_tensor=16)),
    ("gemma_2b_v5e_1pod", "gemma1_2b", 1, dict(ici_fsdp=256, ici_tensor=1)),
    ("gemma_2b_v5e_2pods", "gemma1_2b", 2, dict(ici_fsdp=256, ici_tensor=1)),
])
def test_pod_configs_match_the_report_layouts(name, preset, pods, ici):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert c.model.preset == preset and c.train.seq_len == 8192
  assert c.model.remat_policy == "full" and c.model.dtype == "bfloat16"
  assert {k: c.mesh[k] for k in ici} == ici and c.mesh.ici_data == 1
  assert c.mesh.dcn_data == pods and c.mesh.dcn_fsdp == c.mesh.dcn_tensor == 1
  assert c.mesh.ici_fsdp * c.mesh.ici_tensor == 256  # one v5e-256 pod
  # Rows split evenly over the data-parallel chips of every pod.
  assert c.train.global_batch % (pods * c.mesh.ici_fsdp) == 0
  m = model_config(c)  # validates (seq 8192 within the model's context)
  # The FLOPs the report's table is built on, against an independent figure: 6 x the parameter
  # counts the Gemma report publishes (its Table 2: embedding + non-embedding; the norm scales
  # in the latter, ~2e-5 of the total, are the only non-matmul weights) plus PaLM's attention
  # term 12 x layers x heads x head_dim x context, context (L + 1) / 2 for a causal row.
  embedding, non_embedding = GEMMA_REPORT_PARAMS[preset]
  L = c.train.seq_len
  attention = 12 * m.num_layers * m.num_heads * m.head_dim * (L + 1) / 2
  want = 6 * (embedding + non_embedding) + attention
  assert flops.flops_per_token(m, L) == pytest.approx(want, rel=1e-4)


# The Gemma 2 report's pod layouts (shared/REFERENCE.md section 4): chips, data x model ways; the
# data ways as replicas x ZeRO-3 shards (9B: d_model 3584 divides by 512, not by 1024).
@pytest.mark.parametrize("name,preset,chips,data,model,replicas", [
    ("gemma2_9b_v4_8x16x32", "gemma2_9b", 4096, 1024, 4, 2),
    ("gemma2_27b_v5p_8x24x32", "gemma2_27b", 6144, 768, 8, 1),
])
def test_gemma2_pod_configs_match_the_report_layouts(name, preset, chips, data, model, replicas):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert c.model.preset == preset and c.train.seq_len == 8192
  assert c.model.remat_policy == "full" and c.model.dtype == "bfloat16"
  assert f"--topology={module.TOPOLOGY}" in module.__doc__  # the documented compile
  mesh = aot.topology_mesh(c.mesh, module.TOPOLOGY, 1)  # libtpu's devices of the real slice
  assert mesh.devices.size == chips  # one device per chip: v4 megacore, not one per TensorCore
  assert dict(mesh.shape) == {"data": replicas, "fsdp": data // replicas, "sequence": 1,
                             "tensor": model}
  m = model_config(c)  # validates (seq 8192 within the model's context)
  assert m.d_model % (data // replicas) == 0  # ZeRO-3 shards every [.., d_model, ..] parameter
  # Each tensor group is a box of `model` neighbouring chips of the torus (traffic stays local),
  # also where tensor 4 splits v4's ring of 8.
  for group in mesh.devices.reshape(-1, model):
    coords = [d.coords for d in group]
    box = math.prod(max(x) - min(x) + 1 for x in zip(*coords, strict=True))
    assert box == model, coords
  assert c.train.global_batch % data == 0  # rows split evenly over the data-parallel groups


def test_gemma2_distillation_config_matches_the_report():
  """configs/gemma2_2b_distill_v5e.py: a Gemma 2 2B student of a Gemma 2 9B teacher (declared by
  preset, so the step is built without the checkpoint) on 2 v5e pods of 256-way ZeRO-3; the
  step's FLOPs add the teacher's forward pass (2 per matmul weight plus the attention term)."""
  from maxgemma.trainer import distill

  spec = importlib.util.spec_from_file_location("d", ROOT / "configs" / "gemma2_2b_distill_v5e.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert c.model.preset == "gemma2_2b" and c.distill.teacher_preset == "gemma2_9b"
  assert c.train.seq_len == 8192 and c.distill.alpha == 0.0 and c.distill.teacher_dtype
  assert (c.mesh.ici_data, c.mesh.ici_fsdp, c.mesh.dcn_data) == (1, 256, 2)
  assert c.train.global_batch % 512 == 0
  student = model_config(c)
  teacher = distill.teacher_config(c, student)
  assert teacher.step == -1 and teacher.model_cfg.num_layers == 42
  assert teacher.model_cfg.attention_impl == "splash" == student.attention_impl
  objective = distill.from_config(c, student)
  t = teacher.model_cfg
  L = c.train.seq_len
  weights = t.num_layers * (t.d_model * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
                            + 3 * t.d_model * t.ffn_dim) + t.vocab_size * t.d_model
  context = sum(flops.mean_context(L, w) for w in t.layer_windows())
  teacher_forward = 2 * weights + 4 * t.num_heads * t.head_dim * context
  assert objective.flops_per_token(L) == pytest.approx(
      flops.flops_per_token(student, L) + teacher_forward, rel=1e-9)


def test_offloaded_optimizer_state_is_host_memory_in_the_tpu_program(two_slices):
  """optim.offload_state on the real TPU compile: the optimizer state's shards are host-memory
  arguments of the step (what the program gets from the host), not device ones."""
  cfg = tiny_config()
  cfg.optim.offload_state = True
  r = aot.compile_train_step(cfg, SLICE, 2, keep_compiled=True)
  opt_bytes = sum(shard_bytes(x) for x in jax.tree.leaves(r["state"]["opt_state"]))
  on_device = two_slices["memory"]["argument_bytes"]
  assert {x.sharding.memory_kind for x in jax.tree.leaves(r["state"]["opt_state"])} == {
      "pinned_host"}
  assert r["memory"]["host_argument_bytes"] >= opt_bytes > 0
  assert r["memory"]["argument_bytes"] <= on_device - opt_bytes
  assert two_slices["memory"]["host_argument_bytes"] == 0


# The Gemma 3 report's layouts (Table 2, data x sequence x replica; shared/REFERENCE.md section 4):
# its data is `fsdp` (ZeRO-3), its sequence `sequence`, its replicas `data` (ICI x DCN).
@pytest.mark.parametrize("name,overrides,topology,slices,report", [
    ("gemma3_1b_v5e_512", {}, "v5e:16x16", 2, (16, 16, 2)),
    ("gemma3_4b_v5e_2048", {"ici_fsdp": 16, "ici_sequence": 16}, "v5e:16x16", 8, (16, 16, 8)),
    ("gemma3_12b_v4_6144", {}, "v4:8x16x16", 3, (16, 16, 24)),
    ("gemma3_27b_v5p_6144", {}, "v5p:8x24x32", 1, (24, 8, 32)),
])
def test_gemma3_pod_configs_give_the_report_layouts(name, overrides, topology, slices, report):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for key, value in overrides.items():  # the override the docstring names
    assert f"--config.mesh.{key}={value}" in module.__doc__
    c.mesh[key] = value
  assert c.train.seq_len == 32768 and c.model.attention_impl == "splash"
  mesh = aot.topology_mesh(c.mesh, topology, slices)  # libtpu's devices of the real slices
  data, sequence, replicas = report
  assert mesh.devices.size == data * sequence * replicas
  assert (mesh.shape["fsdp"], mesh.shape["sequence"], mesh.shape["data"]) == report
  assert mesh.shape["tensor"] == 1
  model_config(c)  # validates the splash tiles against the length per chip
  assert c.train.global_batch % (data * replicas) == 0  # whole rows per data-parallel group
