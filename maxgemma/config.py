"""Experiment configuration: the shared defaults every `configs/*.py` file starts from.

An experiment file defines `get_config()` returning `base_config()` with its changes; the command
line overrides any key (`--config.train.steps=100`). Model sizes come from a named preset
(`config.model.preset`); every `ModelConfig` field can be overridden under `config.model`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

import ml_collections
from ml_collections import config_dict

from maxgemma.model.config import SPLASH_BLOCKS, ModelConfig
from maxgemma.model.presets import get_preset

# ModelConfig fields that only a preset sets (structural tuples are not command-line friendly).
_PRESET_ONLY = ("attention_pattern",)


def _model_section() -> ml_collections.ConfigDict:
  """`preset` plus a typed, unset placeholder for every overridable ModelConfig field."""
  hints = typing.get_type_hints(ModelConfig)
  section = {"preset": "tiny_gemma2"}
  for field in dataclasses.fields(ModelConfig):
    if field.name in _PRESET_ONLY:
      continue
    kind = next((t for t in (bool, int, float, str) if t in typing.get_args(hints[field.name])
                 or hints[field.name] is t), str)
    section[field.name] = config_dict.placeholder(kind)
  return ml_collections.ConfigDict(section)


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every section: model, mesh, data, optim, train, checkpoint, metrics, distill."""
  c = ml_collections.ConfigDict()
  c.model = _model_section()

  # Mesh axes: ICI inside a pod/slice, DCN across slices. -1 means "all remaining devices".
  # `sequence` splits activations along their length (docs/parallelism.md).
  c.mesh = ml_collections.ConfigDict(dict(
      ici_data=-1, ici_fsdp=1, ici_sequence=1, ici_tensor=1,
      dcn_data=1, dcn_fsdp=1, dcn_sequence=1, dcn_tensor=1,
      shard_params=True,  # ZeRO-3: parameters (not only optimizer state) sharded over fsdp
      shard_state_over_sequence=False,  # the state's fsdp sharding spans fsdp x sequence
      shard_residuals=True,  # the residual stream between blocks split along length over tensor
      # (and sequence, which splits every length)
      host_block="",  # CPU processes only: "FxT" lays each process's devices as an F x T block of
      # the fsdp x tensor grid, as a TPU host's chips sit in the torus (launch.local rehearsals)
  ))

  c.data = ml_collections.ConfigDict(dict(
      sources="",  # "GLOB[:WEIGHT],GLOB[:WEIGHT]": prepared ArrayRecord shards ("" = demo corpus)
      eval_sources="",
      tokenizer="",  # SentencePiece model path ("" = the packaged demo tokenizer)
      cache_dir="",  # local copies of gs:// shards ("" = $MAXGEMMA_CACHE or ~/.cache/maxgemma)
      shuffle=True,
      packing=True,
      packing_method="best_fit",  # best_fit | first_fit (grain packers)
      packing_bins=64,  # rows packed at once: more bins, less padding
      worker_count=0,  # grain worker processes (0 = in the main process)
      prefetch=2,  # batches prefetched in a background thread (0 = none)
      # Loader shards: independent streams giving global_batch / loader_shards rows each; the
      # batch at each step depends on this count, never on processes or mesh (0 = one per row).
      loader_shards=0,
      # Offline distillation: directories of `python -m maxgemma.teacher_logits` (comma-
      # separated) aligned with the sources; batches then carry teacher_ids / teacher_weights.
      teacher_topk="",
  ))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=3e-4, schedule="cosine", warmup_steps=100,
      decay_steps=config_dict.placeholder(int),  # None: train.steps
      end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
      moments_dtype="float32", grad_accum_steps=1, z_loss=0.0,
      decay_embeddings=False,  # True: weight decay on the input embedding too
      offload_state=False,  # True: the optimizer state lives in pinned host memory between steps
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, global_batch=8, seq_len=128, seed=0, nan_policy="stop",  # stop | skip
      loss_chunk=0,  # > 0: cross-entropy over chunks of this many positions (no full logits)
      eval_every=0, eval_steps=4, profile_steps="",  # "START:STOP" traces that step range
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep_last=3, keep_every=0,
                                                async_save=True,
                                                lock_stale_s=120.0))  # gs:// run lock lease
  c.metrics = ml_collections.ConfigDict(dict(log_every=1, tensorboard=True,
                                             peak_flops_per_device=0.0))  # 0: measured/known
  c.distill = ml_collections.ConfigDict(dict(  # docs/distillation.md
      teacher="",  # online: a maxgemma workdir whose latest checkpoint is the frozen teacher
      temperature=1.0, alpha=0.0,  # alpha: the next-token loss's share of the objective
      loss_chunk=256,  # positions per chunk of both models' logits (no [B, L, V] logits)
      teacher_dtype="",  # the teacher's params and compute dtype ("" = its checkpoint's config)
      teacher_preset="",  # the teacher's architecture, checked against its checkpoint at load
      # ("" = the checkpoint's; set, maxgemma.aot compiles without the checkpoint)
  ))
  c.dpo = ml_collections.ConfigDict(dict(  # docs/finetune.md
      enabled=False, beta=0.1, label_smoothing=0.0,
      reference="",  # a workdir whose latest checkpoint is the frozen reference ("" = the
      # policy's starting weights: config.lora.base, or the fresh weights of train.seed)
  ))
  c.lora = ml_collections.ConfigDict(dict(  # docs/finetune.md
      targets="",  # comma-separated of q,k,v,o,gate,up,down ("" = full fine-tuning)
      rank=8, alpha=16.0, dropout=0.0,
      base="",  # a workdir whose latest checkpoint is the frozen base ("" = fresh weights)
  ))
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator="", num_processes=0, process_id=-1,  # all unset: single process or TPU auto
  ))
  return c


def use_splash(model: ml_collections.ConfigDict, tile: int) -> None:
  """`config.model` set to the Pallas splash kernel with every tile `tile` long and the separate
  dq pass (the pod configs' setting)."""
  model.attention_impl = "splash"
  model.update({f"splash_{name}": tile for name in SPLASH_BLOCKS}, splash_fused_bwd=False)


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """The validated ModelConfig: the preset with every set `config.model` field applied."""
  overrides = {k: v for k, v in c.model.items() if k != "preset" and v is not None}
  return get_preset(c.model.preset, **overrides).validate(seq_len=c.train.seq_len)


def check_keys(c: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None,
               prefix: str = "") -> None:
  """Raises ValueError for a key the defaults do not have, naming the nearest valid keys."""
  reference = base_config() if reference is None else reference
  for key, value in c.items():
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=3)
      hint = f"; did you mean {', '.join(prefix + k for k in close)}?" if close else ""
      raise ValueError(f"unknown config key {prefix + key!r}{hint} Valid keys under "
                       f"{prefix or 'config.'!r}: {', '.join(reference.keys())}")
    if isinstance(value, ml_collections.ConfigDict) and isinstance(reference[key],
                                                                   ml_collections.ConfigDict):
      check_keys(value, reference[key], prefix + key + ".")
