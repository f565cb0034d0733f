"""Batched text generation from a checkpoint, with a KV cache, on one device or a sharded mesh.

  python -m maxgemma.sample --workdir=DIR --prompt="Once upon a time" [--prompt=...]
      [--max_new_tokens=64] [--temperature=0] [--top_k=0] [--top_p=1] [--chat] [--step=N]
      [--dtype=float32] [--tensor=1]
  python -m maxgemma.sample --preset=gemma1_7b --topology=v5e:2x2 --tensor=4 [--batch=1]
      [--max_len=1024] [--dtype=bfloat16]     # compiled memory per chip, nothing sampled

Shape letters: B batch, P prompt length, T new tokens, V vocab.

Prompts of different lengths are left-padded (padding has position -1 and is never attended to).
Local layers keep ring buffers of `sliding_window` slots, global layers one slot per token.
Two compiled programs run: the prefill (the whole prompt in one call) and the decode loop (every
new token in one `lax.while_loop`, cache updated in place, no host round trip per token).
Generation stops at `<end_of_turn>` or eos (per row); tokens/s of the decode loop are reported.

`--tensor=N` lays the devices out as a (data, fsdp=1, tensor=N) mesh: the parameters are sharded
N ways by the logical-axis rules of `maxgemma.sharding`, the KV cache over batch and key/value
heads, and the prompts split over the remaining `data` devices (the batch is padded to a multiple
of it). Under `launch.local` (or on a multi-host slice) every process runs the same command and
process 0 prints the text.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxgemma import sharding
from maxgemma.model import kv_cache
from maxgemma.model.config import ModelConfig
from maxgemma.model.gemma import Transformer
from maxgemma.model.params import stack_layers, unstack_layers

Array = jax.Array
PAD_ID, EOS_ID, END_OF_TURN_ID = 0, 1, 107


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def validate(self) -> SamplingConfig:
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    return self


def filter_logits(logits_BV: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Logits with everything outside the top-k and the top-p nucleus set to -inf."""
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token when the mass before it is below top_p (the most likely one always stays).
    keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample_logits(logits_BV: Array, rng: Array, sampling: SamplingConfig) -> Array:
  """Next tokens [B] from float32 logits [B, V]."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]  # generated ids per row (up to and excluding the stop token)
  logits: np.ndarray | None  # [B, steps, V] float32 when asked for
  prefill_s: float
  decode_s: float
  decode_steps: int
  batch: int
  compile_s: float = 0.0  # placing the parameters and compiling (when not compiled already)

  @property
  def tokens_per_s(self) -> float:
    """Decode throughput: tokens produced by all rows per second of the decode loop."""
    return self.batch * self.decode_steps / max(self.decode_s, 1e-9)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = PAD_ID
             ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P], positions [B, P]) with prompts right-aligned; padding has position -1."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  P = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  positions = np.full((len(prompts), P), -1, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, P - len(p):] = p
    positions[b, P - len(p):] = np.arange(len(p))
  return tokens, positions


# ---------------------------------------------------------------------------- mesh and layout

def sampler_mesh(tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """The (data, fsdp=1, tensor) mesh over `devices` (default all): `data` = devices / tensor."""
  devices = list(jax.devices() if devices is None else devices)
  if tensor < 1 or len(devices) % tensor:
    raise ValueError(f"--tensor={tensor} does not divide the {len(devices)} devices; use a "
                     f"divisor of {len(devices)}")
  mesh_cfg = ml_collections.ConfigDict(dict(ici_data=len(devices) // tensor, ici_fsdp=1,
                                            ici_tensor=tensor, dcn_data=1, dcn_fsdp=1,
                                            dcn_tensor=1))
  return sharding.make_mesh(mesh_cfg, devices)


def single_device_mesh() -> Mesh:
  """The mesh of this process's first device: the unsharded sampler."""
  return sampler_mesh(1, jax.local_devices()[:1])


def decode_config(cfg: ModelConfig, dtype: str | None = None) -> ModelConfig:
  """The model config decoding runs: unrolled layers (ring-buffer caches), no remat."""
  return cfg.replace(scan_layers=False, remat_policy="none", **({"dtype": dtype} if dtype else {}))


def abstract_params(cfg: ModelConfig) -> Any:
  """Boxed (logically annotated) parameter shapes of `cfg`'s tree, in the compute dtype."""
  boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  return jax.tree.map(lambda x: x.replace(value=jax.ShapeDtypeStruct(
      x.value.shape, _decode_dtype(x.value, cfg))), boxed["params"],
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _decode_dtype(x, cfg: ModelConfig):
  """Matrices (einsum weights, the embedding) in the compute dtype; norm scales as they are.

  The model casts every matrix to `cfg.dtype` before use, so a compute-dtype copy computes the
  same function while reading half the bytes per token in bfloat16.
  """
  return jnp.dtype(cfg.dtype) if x.ndim >= 2 else x.dtype


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Any:
  """NamedShardings of `cfg`'s parameter tree from the logical-axis rules table."""
  return sharding.tree_shardings(abstract_params(cfg), mesh, sharding.rules_for(None))


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
  """NamedShardings of a KV cache (`kv_cache.cache_axes`) from the logical-axis rules table."""
  rules = sharding.rules_for(None)
  return jax.tree.map(
      lambda axes, x: NamedSharding(mesh, sharding.mesh_spec(axes, x.shape, mesh, rules)),
      kv_cache.cache_axes(cache), cache, is_leaf=lambda x: isinstance(x, tuple))


def place(params: Any, shardings: Any, cfg: ModelConfig) -> Any:
  """Params (numpy or jax, any tree matching `shardings`) in the compute dtype on their shardings.

  Host arrays go through `make_array_from_callback` (each process gives its devices' pieces).
  """
  def put(x, s):
    dtype = _decode_dtype(x, cfg)
    if isinstance(x, jax.Array):
      return jax.device_put(x.astype(dtype), s)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx].astype(dtype))
  return jax.tree.map(put, params, shardings)


def host_array(x: np.ndarray, mesh: Mesh, spec: PartitionSpec) -> Array:
  """A global array from a host array every process holds in full."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


# ---------------------------------------------------------------------------- the two programs

def _rules_scope(mesh: Mesh):
  return nn.logical_axis_rules(sharding.rules_for(None)), jax.set_mesh(mesh)


def make_programs(cfg: ModelConfig, mesh: Mesh, cache_sh: Any, *, max_new_tokens: int,
                  sampling: SamplingConfig, stop_ids: Sequence[int], return_logits: bool):
  """(prefill, decode_loop): jitted on `mesh`, the cache (shardings `cache_sh`) donated to both.

  prefill(params, tokens_BP, positions_BP, cache) -> (logits_BV of the last position, cache).
  decode_loop(params, logits_BV, cache, last_pos_B, done_B, seed) -> (tokens_BT, steps,
  logits_BTV or None, cache): token t is sampled from the logits of step t, rows already done
  write -1, and the loop stops after `max_new_tokens` steps or when every row is done.
  """
  model = Transformer(cfg)
  T = max_new_tokens
  stop = np.asarray(list(stop_ids), np.int32)
  replicated = NamedSharding(mesh, PartitionSpec())
  # Both programs return the cache on `cache_sh`, so the loop updates the donated one in place.
  data = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)  # the batch is a multiple of it
  logits_sh = NamedSharding(mesh, sharding.mesh_spec(("act_batch", "act_vocab"),
                                                     (data, cfg.vocab_size), mesh,
                                                     sharding.rules_for(None)))

  def decode(params, tokens_BL, positions_BL, cache):
    return model.apply({"params": params}, tokens_BL, positions_BL, cache,
                       method=Transformer.decode)

  def prefill(params, tokens_BP, positions_BP, cache):
    logits_BPV, cache = decode(params, tokens_BP, positions_BP, cache)
    return logits_BPV[:, -1], cache

  def decode_loop(params, logits_BV, cache, last_pos_B, done_B, seed):
    B, V = logits_BV.shape
    out_BT = jnp.full((B, T), -1, jnp.int32)
    logits_BTV = jnp.zeros((B, T, V), jnp.float32) if return_logits else None

    def cond(carry):
      t, done_B = carry[0], carry[4]
      return (t < T) & ~jnp.all(done_B)

    def body(carry):
      t, logits_BV, cache, pos_B, done_B, rng, out_BT, logits_BTV = carry
      rng, key = jax.random.split(rng)
      next_B = sample_logits(logits_BV, key, sampling)
      out_BT = out_BT.at[:, t].set(jnp.where(done_B, -1, next_B))
      if return_logits:
        logits_BTV = logits_BTV.at[:, t].set(logits_BV)
      done_B = done_B | jnp.isin(next_B, stop)
      pos_B = pos_B + 1
      logits_B1V, cache = decode(params, next_B[:, None], pos_B[:, None], cache)
      return t + 1, logits_B1V[:, 0], cache, pos_B, done_B, rng, out_BT, logits_BTV

    carry = (jnp.zeros((), jnp.int32), logits_BV, cache, last_pos_B, done_B,
             jax.random.key(seed), out_BT, logits_BTV)
    t, _, cache, *_, out_BT, logits_BTV = jax.lax.while_loop(cond, body, carry)
    return out_BT, t, logits_BTV, cache  # the cache out, so the loop runs on the donated one

  prefill_j = jax.jit(prefill, donate_argnums=(3,), out_shardings=(logits_sh, cache_sh))
  loop_j = jax.jit(decode_loop, donate_argnums=(2,),
                   out_shardings=(replicated, replicated, replicated if return_logits else None,
                                  cache_sh))
  return prefill_j, loop_j


def _compiled(fn, *args, mesh: Mesh):
  rules, mesh_ctx = _rules_scope(mesh)
  with rules, mesh_ctx:
    return fn.lower(*args).compile()


def _prefill_outputs(prefill_c, B: int, cfg: ModelConfig, cache: Any) -> tuple[Any, Any]:
  """Abstract (logits_BV, cache) as the compiled prefill returns them, shardings included."""
  logits_sh, cache_sh = prefill_c.output_shardings
  logits = jax.ShapeDtypeStruct((B, cfg.vocab_size), jnp.float32, sharding=logits_sh)
  cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       cache, cache_sh)
  return logits, cache


# Compiled (prefill, decode loop) by everything they depend on, so that a repeated call (tests,
# benchmarks) does not compile again; the last few are kept.
_PROGRAMS: dict[tuple, tuple[Any, Any]] = {}


def generate(params: dict, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             stop_ids: Sequence[int] = (EOS_ID, END_OF_TURN_ID), seed: int = 0,
             ring: bool | None = None, return_logits: bool = False,
             mesh: Mesh | None = None) -> Generation:
  """Generates up to `max_new_tokens` per prompt with a KV cache (prefill, then one loop).

  `params` may be scanned or unrolled, numpy or jax; `cfg.scan_layers` decides which model runs
  (scanned needs full-length caches for every layer, unrolled uses ring buffers for local layers
  by default). `mesh` (from `sampler_mesh`; default: this process's first device) shards the
  parameters and splits the prompts over its `data` axis.
  """
  sampling.validate()
  if "layers" in params and not cfg.scan_layers:
    params = unstack_layers(params)
  elif "layers" not in params and cfg.scan_layers:
    params = stack_layers(params)
  mesh = single_device_mesh() if mesh is None else mesh
  tokens_BP, positions_BP = left_pad(prompts)
  n, P = tokens_BP.shape
  max_len = P + max_new_tokens
  if max_len > cfg.max_seq_len:
    raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                     f"context max_seq_len={cfg.max_seq_len}; ask for fewer tokens")
  # Pad the batch to a multiple of the data-parallel size with copies of row 0, done from start.
  data = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  B = -(-n // data) * data
  rows = np.arange(B) % n
  tokens_BP, positions_BP = tokens_BP[rows], positions_BP[rows]
  last_B, done_B = positions_BP[:, -1], np.arange(B) >= n
  batch = PartitionSpec(sharding.BATCH_AXES)

  t0 = time.perf_counter()
  params = place(params, param_shardings(cfg, mesh), cfg)
  init = lambda: kv_cache.init_cache(cfg, B, max_len, ring=ring)
  cache_sh = cache_shardings(jax.eval_shape(init), mesh)
  cache = jax.jit(init, out_shardings=cache_sh)()
  tokens_BP, positions_BP, last_B, done_B = (
      host_array(x, mesh, batch) for x in (tokens_BP, positions_BP, last_B, done_B))
  seed = host_array(np.int32(seed), mesh, PartitionSpec())
  key = (cfg, mesh, B, P, max_new_tokens, sampling, tuple(stop_ids), return_logits, ring)
  if key not in _PROGRAMS:
    prefill, loop = make_programs(cfg, mesh, cache_sh, max_new_tokens=max_new_tokens,
                                  sampling=sampling, stop_ids=stop_ids,
                                  return_logits=return_logits)
    prefill_c = _compiled(prefill, params, tokens_BP, positions_BP, cache, mesh=mesh)
    logits_abs, cache_abs = _prefill_outputs(prefill_c, B, cfg, cache)
    loop_c = _compiled(loop, params, logits_abs, cache_abs, last_B, done_B, seed, mesh=mesh)
    if len(_PROGRAMS) >= 4:
      _PROGRAMS.pop(next(iter(_PROGRAMS)))
    _PROGRAMS[key] = prefill_c, loop_c
  prefill_c, loop_c = _PROGRAMS[key]
  compile_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  logits_BV, cache = prefill_c(params, tokens_BP, positions_BP, cache)
  logits_BV.block_until_ready()
  prefill_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out_BT, steps, logits_BTV, _ = loop_c(params, logits_BV, cache, last_B, done_B, seed)
  out_BT = np.asarray(out_BT)  # replicated: every process holds it whole
  decode_s = time.perf_counter() - t0
  steps = int(steps)

  stop_set = {int(s) for s in stop_ids}
  rows = []
  for b in range(n):
    row = []
    for tok in out_BT[b, :steps].tolist():
      if tok < 0 or tok in stop_set:
        break
      row.append(tok)
    rows.append(row)
  logits = np.asarray(logits_BTV)[:n, :steps] if return_logits else None
  return Generation(rows, logits, prefill_s, decode_s, steps, n, compile_s)


# ---------------------------------------------------------------------------- loading

def load_sharded(workdir: str, step: int | None, mesh: Mesh, dtype: str | None = None
                 ) -> tuple[dict, ModelConfig, int]:
  """(params on `mesh` in the compute dtype, the decode config, step) of a checkpoint.

  Orbax reads each device's shard straight into its sharding, cast to the compute dtype, so no
  device ever holds the whole model; a scanned checkpoint is then split into layers on device.
  A LoRA run's checkpoint gives the merged model (`_load_lora`).
  """
  from maxgemma.checkpoint import Checkpointer, model_config_from_dict  # noqa: PLC0415

  ckpt = Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.step_or_latest(step)
    meta = ckpt.meta(step)
    if ((meta.get("config") or {}).get("lora") or {}).get("targets"):
      return _load_lora(workdir, step, mesh, dtype)
    saved = model_config_from_dict(meta["model"])
    cfg = decode_config(saved, dtype)
    stored = cfg.replace(scan_layers=saved.scan_layers)
    boxed = abstract_params(stored)
    shardings = sharding.tree_shardings(boxed, mesh, sharding.rules_for(None))
    params = ckpt.restore(step, {"params": nn.unbox(boxed)}, {"params": shardings})["params"]
  finally:
    ckpt.close()
  if "layers" in params:
    params = jax.jit(unstack_layers, out_shardings=param_shardings(cfg, mesh))(params)
  return params, cfg, step


def _load_lora(workdir: str, step: int, mesh: Mesh, dtype: str | None
               ) -> tuple[dict, ModelConfig, int]:
  """A LoRA run's checkpoint as the merged model: the base checkpoint the run recorded (or the
  fresh init of its train.seed) with the adapters merged in, layer by layer on the host
  (`peft_format.MergedReader`, as the merged export), then placed on `mesh`."""
  from maxgemma.convert import peft_format  # noqa: PLC0415
  from maxgemma.convert.checkpoint_reader import CheckpointReader  # noqa: PLC0415

  reader = peft_format.MergedReader(peft_format.lora_run(CheckpointReader(workdir, step)))
  cfg = decode_config(reader.config, dtype)
  params = {**reader.embedder_and_final_norm(),
            **{f"layer_{i}": reader.block(i) for i in range(cfg.num_layers)}}
  return place(params, param_shardings(cfg, mesh), cfg), cfg, step


# ---------------------------------------------------------------------------- memory on a TPU

def _tpu(topology: str, num_slices: int):
  """(devices of the topology, its chip) from the AOT module (libtpu) and the chip table."""
  try:
    from maxgemma import aot  # noqa: PLC0415
  except ImportError:  # the module's older name
    from maxgemma import compile as aot  # noqa: PLC0415
  try:
    from maxgemma.hardware import chip_for_topology as chip_for  # noqa: PLC0415
  except ImportError:
    chip_for = aot.chip_for
  return aot.topology_devices(topology, num_slices), chip_for(topology)


def memory_report(cfg: ModelConfig, topology: str, *, tensor: int, batch: int, prompt_len: int,
                  max_new_tokens: int, num_slices: int = 1) -> dict[str, Any]:
  """Compiles this sampler's prefill and decode loop for `topology` (nothing is allocated).

  Returns each program's `memory_analysis()` per chip and the peak of the two, against the
  chip's usable HBM (or, when the compiler refuses for lack of HBM, its message). The
  parameters and the cache are arguments of both programs.
  """
  devices, chip = _tpu(topology, num_slices)
  mesh = sampler_mesh(tensor, devices)
  cfg = decode_config(cfg)
  data = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  B = -(-batch // data) * data
  max_len = prompt_len + max_new_tokens
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  params = jax.tree.map(sds, nn.unbox(abstract_params(cfg)), param_shardings(cfg, mesh))
  cache = jax.eval_shape(lambda: kv_cache.init_cache(cfg, B, max_len))
  cache_sh = cache_shardings(cache, mesh)
  cache = jax.tree.map(sds, cache, cache_sh)
  batch_sh = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
  prefill, loop = make_programs(cfg, mesh, cache_sh, max_new_tokens=max_new_tokens,
                                sampling=SamplingConfig(), stop_ids=(EOS_ID,),
                                return_logits=False)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  report = {"model": cfg.family, "dtype": cfg.dtype, "topology": topology,
            "num_slices": num_slices, "chips": len(devices), "chip": chip.name,
            "mesh": {k: int(v) for k, v in mesh.shape.items()}, "batch": B,
            "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
            "param_bytes_total": int(param_bytes), "usable_hbm_bytes": chip.usable_hbm_bytes}
  t0 = time.perf_counter()
  try:
    prefill_c = _compiled(prefill, params, ints(B, prompt_len), ints(B, prompt_len), cache,
                          mesh=mesh)
    logits, cache_out = _prefill_outputs(prefill_c, B, cfg, cache)
    done = jax.ShapeDtypeStruct((B,), jnp.bool_, sharding=batch_sh)
    seed = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    loop_c = _compiled(loop, params, logits, cache_out, ints(B), done, seed, mesh=mesh)
  except Exception as e:  # the TPU compiler's HBM refusal is RESOURCE_EXHAUSTED
    if "RESOURCE_EXHAUSTED" not in str(e) and "HBM" not in str(e):
      raise
    first = next((ln.strip() for ln in str(e).splitlines() if "HBM" in ln), str(e)[:200])
    return {**report, "programs": {}, "peak_bytes": None, "fits": False, "refused": first[:300],
            "compile_s": time.perf_counter() - t0}
  programs = {}
  for name, c in (("prefill", prefill_c), ("decode", loop_c)):
    m = c.memory_analysis()
    programs[name] = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "peak_bytes": int(getattr(m, "peak_memory_in_bytes", 0) or (
            m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes))}
  peak = max(p["peak_bytes"] for p in programs.values())
  return {**report, "programs": programs, "peak_bytes": peak,
          "fits": peak <= chip.usable_hbm_bytes, "compile_s": time.perf_counter() - t0}


def format_memory(r: dict[str, Any]) -> str:
  GiB = 1 << 30
  lines = [f"{r['model']} {r['dtype']} sampler on {r['num_slices']} x {r['topology']} "
           f"({r['chips']} x {r['chip']}, mesh {r['mesh']}), batch {r['batch']}, prompt "
           f"{r['prompt_len']} + {r['max_new_tokens']} new tokens; parameters "
           f"{r['param_bytes_total'] / GiB:.2f} GiB in all"]
  for name, p in r["programs"].items():
    lines.append(f"  {name:8s} arguments {p['argument_bytes'] / GiB:6.2f} GiB, temporaries "
                 f"{p['temp_bytes'] / GiB:6.2f} GiB, peak {p['peak_bytes'] / GiB:6.2f} GiB "
                 "per chip")
  if r.get("refused"):
    lines.append(f"does NOT fit: the TPU compiler refused: {r['refused']}")
    return "\n".join(lines)
  verdict = "fits" if r["fits"] else "does NOT fit"
  lines.append(f"peak {r['peak_bytes'] / GiB:.2f} GiB of {r['usable_hbm_bytes'] / GiB:.2f} GiB "
               f"usable HBM per chip: {verdict}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- the CLI

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Experiment directory holding checkpoints/.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat for a batch.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_bool("chat", False, "Wrap each prompt in the Gemma chat template (user turn).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("tokenizer", "", "SentencePiece model (default: WORKDIR/tokenizer.model, "
                      "then the training config's tokenizer).")
  flags.DEFINE_string("dtype", "float32", "Compute dtype for sampling (float32 or bfloat16); "
                      "the weights are held in it.")
  flags.DEFINE_integer("tensor", 1, "Shard the parameters this many ways (tensor axis); the "
                       "other devices split the prompts (data axis).")
  flags.DEFINE_string("topology", "", "Compile for this TPU topology (e.g. v5e:2x2) with libtpu "
                      "and print the memory per chip instead of sampling (needs --preset).")
  flags.DEFINE_string("preset", "", "Model preset for --topology.")
  flags.DEFINE_integer("num_slices", 1, "Slices of --topology.")
  flags.DEFINE_integer("batch", 1, "Prompts per batch for --topology.")
  flags.DEFINE_integer("prompt_len", 512, "Prompt tokens for --topology.")


def _memory_main() -> None:
  from maxgemma.model.presets import get_preset  # noqa: PLC0415

  if not FLAGS.preset:
    raise ValueError("--topology needs --preset (e.g. --preset=gemma1_7b)")
  cfg = get_preset(FLAGS.preset, dtype=FLAGS.dtype)
  print(format_memory(memory_report(cfg, FLAGS.topology, tensor=FLAGS.tensor, batch=FLAGS.batch,
                                    prompt_len=FLAGS.prompt_len,
                                    max_new_tokens=FLAGS.max_new_tokens,
                                    num_slices=FLAGS.num_slices)))


def _sample_main() -> None:
  from maxgemma import distributed  # noqa: PLC0415
  from maxgemma.convert.workdir_tokenizer import resolve_tokenizer  # noqa: PLC0415
  from maxgemma.data.tokenizer import load_tokenizer  # noqa: PLC0415

  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  if not FLAGS.prompt:
    raise app.UsageError("pass at least one --prompt")
  distributed.initialize()
  mesh = sampler_mesh(FLAGS.tensor) if FLAGS.tensor > 1 or jax.process_count() > 1 \
      else single_device_mesh()
  params, cfg, step = load_sharded(FLAGS.workdir, FLAGS.step, mesh, FLAGS.dtype)
  tok = load_tokenizer(resolve_tokenizer(FLAGS.workdir, FLAGS.tokenizer))
  texts = list(FLAGS.prompt)
  if FLAGS.chat:
    texts = [tok.chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
             for t in texts]
  prompts = [tok.encode(t, add_bos=True) for t in texts]
  gen = generate(params, cfg, prompts, max_new_tokens=FLAGS.max_new_tokens,
                 sampling=SamplingConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p),
                 seed=FLAGS.seed, mesh=mesh)
  if jax.process_index() != 0:
    return
  for text, row in zip(FLAGS.prompt, gen.tokens, strict=True):
    print(f"=== {text}\n{tok.decode(row)}")
  print(f"step {step}: {len(prompts)} prompts, prefill {gen.prefill_s:.2f}s, "
        f"{gen.decode_steps} decode steps in {gen.decode_s:.2f}s = "
        f"{gen.tokens_per_s:.1f} tokens/s on mesh {dict(mesh.shape)} ({jax.process_count()} "
        f"process(es), {os.cpu_count()} CPUs, {jax.devices()[0].platform})")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  try:
    _memory_main() if FLAGS.topology else _sample_main()
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"maxgemma.sample: {e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
