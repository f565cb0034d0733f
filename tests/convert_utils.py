"""Shared helpers for the conversion tests: tiny workdirs with random weights, HF references."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import torch
import transformers

from maxgemma.checkpoint import Checkpointer
from maxgemma.convert import hf
from maxgemma.model.params import stack_layers
from maxgemma.model.presets import get_preset
from tests.model_utils import random_params

VOCAB = 2048  # the packaged demo tokenizer's pieces
PRESETS = ["tiny_gemma1_mqa", "tiny_gemma2", "tiny_gemma3"]


def make_workdir(root: str, preset: str, seed: int = 5, tokenizer: str | None = "", **overrides):
  """A workdir with one params-only checkpoint (step 7) of random weights; returns (dir, cfg,
  official params). Its training config names `tokenizer` as `data.tokenizer` ("" the packaged
  demo tokenizer); None saves no training config (the checkpoint then names no tokenizer)."""
  cfg = get_preset(preset, **{"vocab_size": VOCAB, **overrides})
  params = random_params(cfg, seed)
  workdir = os.path.join(root, preset)
  ckpt = Checkpointer(workdir, ml_collections.ConfigDict(dict(keep_last=0, keep_every=0,
                                                              async_save=False)))
  train_cfg = None if tokenizer is None else ml_collections.ConfigDict(
      {"data": {"tokenizer": tokenizer}})
  ckpt.save(7, {"params": stack_layers(params)}, model_cfg=cfg, config=train_cfg)
  ckpt.close()
  return workdir, cfg, params


def tokens_for(cfg, batch: int = 2, length: int = 20, seed: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).integers(4, cfg.vocab_size, (batch, length))


def hf_model_from_state(cfg, state: dict) -> transformers.PreTrainedModel:
  """A float32 eager transformers model of `cfg` holding `state` (numpy HF tensors)."""
  config = transformers.AutoConfig.for_model(**hf.hf_config(cfg))
  config._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  return model


def torch_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens))).logits.float().numpy()
