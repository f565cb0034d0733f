"""The config surface: every key documented, every experiment file valid, overrides checked."""

import glob
import importlib
import os
import re

import pytest

from maxgemma import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_key_is_documented():
  text = open(os.path.join(ROOT, "docs", "config.md")).read()
  sections = set(re.findall(r"^## (\w+)", text, re.M))
  for section, values in config_lib.base_config().items():
    assert section in sections, f"docs/config.md has no section for {section!r}"
    for key in values:
      assert f"`{key}`" in text, f"docs/config.md does not describe {section}.{key}"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "[!_]*.py"))))
def test_experiment_configs_are_valid(path):
  module = importlib.import_module(f"configs.{os.path.basename(path)[:-3]}")
  cfg = module.get_config()
  config_lib.check_keys(cfg)
  model_cfg = config_lib.model_config(cfg)
  assert cfg.train.seq_len <= model_cfg.max_seq_len
  assert module.__doc__ and "python -m maxgemma" in module.__doc__  # the run command


def test_model_overrides_and_their_errors():
  cfg = config_lib.base_config()
  cfg.model.preset = "gemma2_2b"
  cfg.model.num_layers = 4
  assert config_lib.model_config(cfg).num_layers == 4
  cfg.model.sliding_window = 100_000
  with pytest.raises(ValueError, match="sliding_window .* is larger than the context"):
    config_lib.model_config(cfg)
  cfg = config_lib.base_config()
  cfg.model.preset = "gemma5"
  with pytest.raises(ValueError, match="unknown model preset 'gemma5'"):
    config_lib.model_config(cfg)
