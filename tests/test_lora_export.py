"""LoRA export: the adapters as PEFT loads them onto the base's hf export, and the merged model as
transformers loads it, both give maxgemma's logits with the adapters merged (`lora.merge`), in
float32; the adapters move the logits (so the comparison can fail); a workdir that is not a LoRA
run is refused for --format=peft in one line."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import peft
import pytest
import torch
import transformers

from maxgemma import lora
from maxgemma.checkpoint import Checkpointer
from maxgemma.convert import peft_format
from maxgemma.convert.safetensors_io import SafetensorsFile
from maxgemma.export import export
from maxgemma.model.gemma import Transformer
from maxgemma.model.params import stack_layers
from maxgemma.model.presets import get_preset
from tests.convert_utils import make_workdir, tokens_for, torch_logits
from tests.train_utils import tiny_config

ATOL = 1e-5  # float32 logits
RANK, ALPHA = 3, 6.0  # scale 2, so a lost alpha / r shows


def lora_workdir(root: str, base: str, cfg, targets: tuple[str, ...], seed: int = 1):
  """A LoRA run's workdir holding one checkpoint of random adapters (B nonzero too), saved as
  the trainer saves them (params = the adapters, the training config and model config in meta);
  returns (dir, adapters)."""
  boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                         np.zeros((1, 4), np.int32))["params"]
  shapes = nn.unbox(lora.abstract_adapters(boxed, targets, RANK))
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  adapters = jax.tree.unflatten(treedef, [rng.normal(0, 0.05, x.shape).astype(np.float32)
                                          for x in leaves])
  train_cfg = tiny_config(**{"lora.targets": ",".join(targets), "lora.rank": RANK,
                             "lora.alpha": ALPHA, "lora.base": base, "data.tokenizer": ""})
  workdir = os.path.join(root, "lora")
  ckpt = Checkpointer(workdir, ml_collections.ConfigDict(dict(keep_last=0, keep_every=0,
                                                              async_save=False)))
  ckpt.save(3, {"params": adapters}, config=train_cfg, model_cfg=cfg)
  ckpt.close()
  return workdir, adapters, boxed


def hf_model(path: str) -> transformers.PreTrainedModel:
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()


def test_peft_and_merged_exports_give_maxgemmas_merged_logits(tmp_path):
  """End to end on tiny Gemma 2 (separate q and kv einsums, grouped heads), every target."""
  base, cfg, params = make_workdir(str(tmp_path), "tiny_gemma2")
  cfg = cfg.replace(dtype="float32")
  targets = tuple(lora.TARGETS)
  workdir, adapters, boxed = lora_workdir(str(tmp_path), base, cfg, targets)
  tokens = tokens_for(cfg)
  forward = jax.jit(lambda p: Transformer(cfg).apply({"params": p}, tokens))  # one compile
  merged = jax.jit(lambda p, a: lora.merge(p, a, boxed, alpha=ALPHA, rank=RANK))(
      stack_layers(params), adapters)
  ours, ours_base = np.asarray(forward(merged)), np.asarray(forward(stack_layers(params)))

  export(base, "hf", str(tmp_path / "base-hf"))
  export(workdir, "peft", str(tmp_path / "adapter"), base_model=str(tmp_path / "base-hf"))
  with open(tmp_path / "adapter" / peft_format.CONFIG_FILE) as f:
    config = json.load(f)
  assert config["peft_type"] == "LORA" and config["r"] == RANK and config["lora_alpha"] == ALPHA
  assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"])
  model = peft.PeftModel.from_pretrained(hf_model(str(tmp_path / "base-hf")),
                                         str(tmp_path / "adapter")).eval()
  lora_layers = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
  assert len(lora_layers) == cfg.num_layers * len(targets)
  theirs = torch_logits(model, tokens)
  err = float(np.max(np.abs(ours - theirs)))
  moved = float(np.max(np.abs(ours - ours_base)))
  print(f"peft tiny_gemma2: max |logit difference| {err:.2e} (the adapters move logits by up "
        f"to {moved:.2f})")
  assert moved > 1000 * ATOL  # the adapters change the logits: the check below can fail
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=ATOL)

  export(workdir, "hf", str(tmp_path / "merged-hf"))
  theirs = torch_logits(hf_model(str(tmp_path / "merged-hf")), tokens)
  err = float(np.max(np.abs(ours - theirs)))
  print(f"merged hf tiny_gemma2: max |logit difference| {err:.2e}")
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=ATOL)


@pytest.mark.parametrize("preset,overrides", [
    ("tiny_gemma1_mha", {}),  # one qkv_einsum [3, N, D, H]
    ("tiny_gemma1_mqa", {"scan_layers": False}),  # one kv head; unrolled adapters (layer_{i})
    ("tiny_gemma3", {}),  # the transposed gating einsum [2, F, D]
])
def test_peft_update_is_the_merged_exports_weight_change(preset, overrides, tmp_path):
  """Per HF projection and layer, (lora_alpha / r) * lora_B @ lora_A equals the merged hf export's
  weight minus the base's: the adapters are laid out as the weights (no model is run)."""
  base, cfg, _ = make_workdir(str(tmp_path), preset, **overrides)
  workdir, _, _ = lora_workdir(str(tmp_path), base, cfg, tuple(lora.TARGETS))
  for fmt, src, name in (("hf", base, "base"), ("hf", workdir, "merged"),
                         ("peft", workdir, "adapter")):
    export(src, fmt, str(tmp_path / name))
  read = lambda name, file: SafetensorsFile(str(tmp_path / name / file))  # noqa: E731
  before, after = read("base", "model.safetensors"), read("merged", "model.safetensors")
  adapter = read("adapter", peft_format.ADAPTER_FILE)
  worst, checked = 0.0, 0
  for i in range(cfg.num_layers):
    for module in peft_format.HF_MODULES.values():
      name = f"model.layers.{i}.{module}"
      a = adapter.read(f"{peft_format.PREFIX}{name}.lora_A.weight")
      b = adapter.read(f"{peft_format.PREFIX}{name}.lora_B.weight")
      delta = after.read(name + ".weight") - before.read(name + ".weight")
      update = (ALPHA / RANK) * b.astype(np.float64) @ a.astype(np.float64)
      assert np.max(np.abs(delta)) > 1e-2  # the adapters change this weight
      worst = max(worst, float(np.max(np.abs(update - delta))))
      checked += 1
  print(f"peft {preset}: {checked} projections, max |update - merged change| {worst:.1e}")
  assert worst < 1e-5


def test_peft_of_a_workdir_that_is_not_a_lora_run_is_refused_in_one_line(tmp_path):
  base, _, _ = make_workdir(str(tmp_path), "tiny_gemma2")
  out = tmp_path / "adapter"
  with pytest.raises(ValueError, match="not a LoRA run") as e:
    export(base, "peft", str(out))
  assert "\n" not in str(e.value) and "--config.lora.targets" in str(e.value)
  assert not out.exists()


def test_peft_of_a_run_on_the_fresh_init_says_its_base_is_in_no_hf_export(tmp_path):
  """`config.lora.base` empty: the adapters export, with a note naming the merged export. (The
  merged model of such a run, the fresh init of train.seed plus the adapters, equals
  `lora.merge(state_lib.init_params(...))` within 1e-6; not run here: compiling the model's init
  twice takes 20-50 s on this CPU.)"""
  cfg = get_preset("tiny_gemma2")
  workdir, _, _ = lora_workdir(str(tmp_path), "", cfg, ("q", "down"))
  done = export(workdir, "peft", str(tmp_path / "adapter"))
  assert "fresh init" in done.note and "--format=hf" in done.note
  with open(tmp_path / "adapter" / peft_format.CONFIG_FILE) as f:
    assert json.load(f)["base_model_name_or_path"] is None
