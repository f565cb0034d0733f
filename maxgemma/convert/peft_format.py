"""A LoRA run out of maxgemma: its adapters in Hugging Face PEFT's format, and the merged model.

A LoRA run's checkpoints hold only the adapters (`maxgemma.lora`): `{<weight path>: {target:
{"a": A [layers?, input dims..., R], "b": B [layers?, R, output dims...]}}}`, the update being
`(alpha / rank) * A @ B`. PEFT keeps, per adapted `nn.Linear` (weight [out_features,
in_features]), `lora_A.weight` [R, in_features] and `lora_B.weight` [out_features, R], the update
`(lora_alpha / r) * lora_B @ lora_A`: the same matrix, transposed.

Which of our input (output) coordinates each HF in (out) feature is comes from
`maxgemma.convert.hf.layer_to_hf` itself: it runs once on a probe block whose adapted weights
hold their own coordinates, so the adapters follow the weights' HF layout (head order, the gating
transpose) by construction.

Shape letters: R rank; I and O the flattened input and output coordinates of one projection.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxgemma import lora
from maxgemma.convert import hf
from maxgemma.convert.atomic_output import atomic_output
from maxgemma.convert.checkpoint_reader import CheckpointReader
from maxgemma.convert.orbax_arrays import nest
from maxgemma.convert.safetensors_io import ShardedWriter
from maxgemma.convert.workdir_tokenizer import WorkdirTokenizer, find_tokenizer
from maxgemma.model.config import ModelConfig
from maxgemma.model.gemma import Transformer
from maxgemma.model.params import stack_layers

# our target -> the HF module it adapts (PEFT's target_modules are the last name)
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."  # PeftModelForCausalLM's name for the wrapped model


@dataclasses.dataclass
class LoraRun:
  """One checkpoint of a LoRA run: its adapters (host arrays) and what they apply to."""

  reader: CheckpointReader  # the run's own checkpoint (its params are the adapters)
  targets: tuple[str, ...]
  rank: int
  alpha: float
  base: str  # the base workdir ("" = the fresh init of `seed`)
  seed: int
  adapters: dict
  base_step: int | None = None  # the base checkpoint the run trained on (None: not recorded)
  dropout: float = 0.0  # config.lora.dropout (PEFT's lora_dropout; training only)

  @property
  def config(self) -> ModelConfig:
    return self.reader.config

  @property
  def step(self) -> int:
    return self.reader.step

  def layer(self, i: int) -> dict:
    """Layer i's adapters in the scanned tree with a layer axis of 1: `{"layers": ...}`."""
    if "layers" in self.adapters:
      return {"layers": jax.tree.map(lambda x: x[i:i + 1], self.adapters["layers"])}
    return {"layers": jax.tree.map(lambda x: x[None], self.adapters[f"layer_{i}"])}


def lora_run(reader: CheckpointReader) -> LoraRun | None:
  """The LoRA run behind `reader`'s checkpoint, or None if that checkpoint is not one's."""
  train_cfg = reader.meta.get("config") or {}
  c = train_cfg.get("lora") or {}
  if not c.get("targets"):
    return None
  adapters = nest({k: reader.arrays.read(k) for k in reader.arrays.keys})
  pinned = reader.meta.get("lora_base") or {}  # recorded by the trainer (`lora.LoRA.pin_base`)
  return LoraRun(reader, lora.parse_targets(str(c["targets"])), int(c["rank"]),
                 float(c["alpha"]), str(pinned.get("workdir", c.get("base")) or ""),
                 int((train_cfg.get("train") or {}).get("seed", 0)), adapters,
                 None if pinned.get("step") is None else int(pinned["step"]),
                 float(c.get("dropout") or 0.0))


def not_lora_error(workdir: str) -> ValueError:
  return ValueError(f"--format=peft: {workdir} is not a LoRA run (its checkpoint's training "
                    "config sets no lora.targets); pass the workdir of a run trained with "
                    "--config.lora.targets=..., or export this one with --format=hf")


def _boxed_block(cfg: ModelConfig) -> Any:
  """The boxed shapes of one layer in the scanned tree (leading `layers` axis)."""
  model = Transformer(cfg.replace(scan_layers=True))
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return {"layers": boxed["layers"]}


def hf_layout(cfg: ModelConfig, targets: tuple[str, ...]
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """target -> (in_I: our flat input coordinate of each HF in-feature, out_O: our flat output
  coordinate of each HF out-feature), read off `hf.layer_to_hf` run on a probe block."""
  boxed = _boxed_block(cfg)
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  # int32: one layer's worth of memory, as a float32 layer (every Gemma weight has < 2**31 entries)
  probe = jax.tree.map(lambda b: np.zeros(b.value.shape[1:], np.int32), boxed, is_leaf=is_box)
  sizes = {}
  for keys, target, leaf in lora._sites(boxed, targets):
    names, shape = tuple(leaf.names), leaf.value.shape
    stack, ins, outs = lora._layout(keys, target, names)
    dims = [d for d in range(len(names)) if d != stack and names[d] != "layers"]

    def flat(which: list[int], shape=shape, dims=dims) -> tuple[np.ndarray, int]:
      """The row-major coordinate over the `which` dimensions, broadcast over `dims`."""
      out, size = np.zeros([1] * len(dims), np.int64), 1
      for d in reversed(which):
        view = [1] * len(dims)
        view[dims.index(d)] = shape[d]
        out = out + np.arange(shape[d], dtype=np.int64).reshape(view) * size
        size *= shape[d]
      return out, size

    in_flat, n_in = flat(ins)
    out_flat, n_out = flat(outs)
    if n_in * n_out >= 2**31:
      raise ValueError(f"{'/'.join(keys)} has {n_in * n_out} entries per layer, more than the "
                       "int32 layout probe holds")
    value = np.broadcast_to(out_flat * n_in + in_flat, [shape[d] for d in dims])
    w = lora._get(probe, keys)
    if stack is None:
      w[...] = value
    else:
      index = dict(lora.TARGETS[target][1])[keys[-2] if keys[-1] == "w" else keys[-1]]
      w[(slice(None),) * (stack - 1) + (index,)] = value
    sizes[target] = n_in, n_out
  tensors = hf.layer_to_hf(probe["layers"], cfg, 0)
  out = {}
  for target, (n_in, n_out) in sizes.items():
    t = tensors[f"model.layers.0.{HF_MODULES[target]}.weight"]  # [O, I]
    in_idx, out_idx = t[0] % n_in, t[:, 0] // n_in
    if not np.array_equal(t, out_idx[:, None] * n_in + in_idx[None, :]) or sorted(
        in_idx.tolist()) != list(range(n_in)) or sorted(out_idx.tolist()) != list(range(n_out)):
      raise AssertionError(f"hf.layer_to_hf does not map {target}'s weight to an [out, in] "
                           "matrix of its input and output coordinates")
    out[target] = in_idx, out_idx
  return out


def peft_tensors(run: LoraRun) -> dict[str, np.ndarray]:
  """Every tensor of `adapter_model.safetensors`, by name, in layer order."""
  layout = hf_layout(run.config, run.targets)
  sites = [(keys, target) for keys, target, _ in lora._sites(_boxed_block(run.config),
                                                             run.targets)]
  out = {}
  for i in range(run.config.num_layers):
    layer = run.layer(i)
    for keys, target in sorted(sites, key=lambda s: list(HF_MODULES).index(s[1])):
      ad = lora._get(layer, keys + (target,))
      a, b = np.asarray(ad["a"])[0], np.asarray(ad["b"])[0]
      in_idx, out_idx = layout[target]
      a_IR, b_RO = a.reshape(-1, run.rank), b.reshape(run.rank, -1)
      name = f"{PREFIX}model.layers.{i}.{HF_MODULES[target]}"
      out[name + ".lora_A.weight"] = np.ascontiguousarray(a_IR[in_idx].T)
      out[name + ".lora_B.weight"] = np.ascontiguousarray(b_RO[:, out_idx].T)
  return out


def peft_config(run: LoraRun, base_model: str) -> dict[str, Any]:
  """The content of `adapter_config.json` (peft.LoraConfig's fields)."""
  alpha = int(run.alpha) if float(run.alpha).is_integer() else run.alpha
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": run.rank, "lora_alpha": alpha,
          "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in run.targets),
          "lora_dropout": run.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
          "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
          "inference_mode": True, "base_model_name_or_path": base_model or run.base or None,
          "revision": None}


def write_peft(run: LoraRun, out: str, dtype: np.dtype, *, overwrite: bool = False,
               base_model: str = "") -> None:
  """DIR/adapter_model.safetensors + DIR/adapter_config.json, which `peft.PeftModel` loads."""
  tensors = peft_tensors(run)
  with atomic_output(out, directory=True, overwrite=overwrite) as tmp:
    writer = ShardedWriter(tmp, {n: (a.shape, dtype) for n, a in tensors.items()},
                           max_shard_bytes=1 << 62)
    for name, array in tensors.items():
      writer.write(name, array)
    writer.close()
    os.replace(os.path.join(tmp, writer.files[0]), os.path.join(tmp, ADAPTER_FILE))
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(peft_config(run, base_model), f, indent=2)


class MergedReader:
  """A LoRA run's checkpoint read as a whole model (base + adapters, merged by `lora.merge`),
  layer by layer, with the interface of `CheckpointReader` that the exporters use. The base is
  the checkpoint step the run recorded (`lora_base` in its meta), else the base's latest.

  `arrays` is the base's: read through it only what no adapter touches (the embedding and the
  final norm); `block` and `leaf` return merged weights.
  """

  def __init__(self, run: LoraRun):
    self.run, self.config, self.step = run, run.config, run.step
    self.workdir, self.meta = run.reader.workdir, run.reader.meta
    if not run.base:
      self.base: Any = _FreshBase(run.config, run.seed)
    else:
      try:
        self.base = CheckpointReader(run.base, run.base_step)
      except FileNotFoundError as e:
        trained_on = "" if run.base_step is None else f" {run.base} at step {run.base_step}"
        raise FileNotFoundError(f"the base of LoRA run {self.workdir} (its config.lora.base"
                                f"{trained_on}): {e}") from None
      diffs = [f for f in ("family", "num_layers", "d_model", "ffn_dim", "num_heads",
                           "num_kv_heads", "head_dim", "vocab_size")
               if getattr(self.base.config, f) != getattr(run.config, f)]
      if diffs:
        raise ValueError(f"the base {run.base} holds another model than LoRA run {self.workdir} "
                         f"(differs in {', '.join(diffs)}); it changed since the run trained")
    self.arrays = self.base.arrays
    self._boxed = _boxed_block(run.config)
    self._adapted = {keys[1:] for keys, _, _ in lora._sites(self._boxed, run.targets)}
    self._merge = jax.jit(lambda base, adapters: lora.merge(  # one compile for every layer
        base, adapters, self._boxed, alpha=run.alpha, rank=run.rank))

  def embedder_and_final_norm(self) -> dict:
    return self.base.embedder_and_final_norm()

  def block(self, i: int) -> dict:
    """Layer i (official `layer_{i}` subtree) with its adapters merged in, in the base dtype."""
    base = {"layers": jax.tree.map(lambda x: np.asarray(x)[None], self.base.block(i))}
    merged = self._merge(base, self.run.layer(i))
    return jax.tree.map(lambda x: np.asarray(x)[0], merged["layers"])

  def leaf(self, i: int, path: tuple[str, ...]) -> np.ndarray:
    if path in self._adapted:
      return lora._get(self.block(i), path)
    return self.base.leaf(i, path)

  def block_paths(self) -> list[tuple[str, ...]]:
    return self.base.block_paths()

  def tokenizer(self, override: str = "") -> WorkdirTokenizer:
    """The LoRA run's tokenizer (its workdir's, else its training config's)."""
    return find_tokenizer(self.workdir, override, self.meta)


class _FreshBase:
  """The base a LoRA run with an empty `config.lora.base` trained on: the model's fresh init
  with `train.seed` (the one `maxgemma.trainer.state.init_params` gives), in memory."""

  def __init__(self, cfg: ModelConfig, seed: int):
    init = jax.jit(lambda key: nn.unbox(Transformer(cfg).init(key, jnp.zeros((1, 8), jnp.int32))
                                        ["params"]))
    params = jax.device_get(init(jax.random.key(seed)))
    self.params = params if cfg.scan_layers else stack_layers(params)
    self.arrays = self

  def read(self, key: tuple[str, ...], index: int | None = None) -> np.ndarray:
    x = np.asarray(lora._get(self.params, key))
    return x if index is None else x[index]

  def embedder_and_final_norm(self) -> dict:
    return {k: self.params[k] for k in ("embedder", "final_norm")}

  def block(self, i: int) -> dict:
    return jax.tree.map(lambda x: np.asarray(x)[i], self.params["layers"])

  def leaf(self, i: int, path: tuple[str, ...]) -> np.ndarray:
    return self.read(("layers", *path), i)

  def block_paths(self) -> list[tuple[str, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(self.params["layers"])[0]
    return [tuple(str(k.key) for k in p) for p, _ in flat]
