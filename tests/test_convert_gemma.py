"""The `gemma` export loads the way the official library loads checkpoints, and its Flax model
gives maxgemma's logits; a nested-layout checkpoint saved like the library's `save_params`
imports back.

`gm.ckpts` itself does not import here: kauldron 1.4.2 (the only version that imports on jax
0.10) lacks `kd.ckpts.AbstractPartialLoader`, which `gemma.gm.ckpts._checkpoint` subclasses. So
the test repeats `gm.ckpts.load_params` for a released (flat) checkpoint with the library's own
code: `ocp.StandardCheckpointer().restore(path)`, then `_compat.param_remapper` and
`_compat.nest_params` from `gemma/gm/ckpts/_compat.py` (loaded from its file), then
`['transformer']`, exactly as its `_flat_to_nested_single` does.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxgemma.checkpoint import load_params
from maxgemma.export import export
from maxgemma.import_weights import import_weights
from maxgemma.model.params import stack_layers
from tests.convert_utils import PRESETS, make_workdir, tokens_for
from tests.gemma_lib import import_gemma
from tests.model_utils import rel_err, run_maxgemma
from tests.test_model_gemma_parity import official_config

TOLERANCE = 1e-5


def library_compat():
  import gemma  # noqa: PLC0415
  path = os.path.join(os.path.dirname(gemma.__file__), "gm", "ckpts", "_compat.py")
  spec = importlib.util.spec_from_file_location("gemma_ckpts_compat", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def library_load_params(path: str) -> dict:
  """`gm.ckpts.load_params(path)` for a flat (released-layout) checkpoint, as the library does."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  compat = library_compat()
  ckpt = ocp.StandardCheckpointer()
  flat = ckpt.restore(path)
  ckpt.close()
  assert all(k.startswith("transformer/") for k in flat)  # the library's FLAT layout test
  return compat.nest_params(compat.param_remapper(flat))["transformer"]


@pytest.mark.parametrize("preset", PRESETS)
def test_official_library_loads_export(preset, tmp_path):
  gm = import_gemma()
  workdir, cfg, params = make_workdir(str(tmp_path), preset)
  out = str(tmp_path / "gemma")
  export(workdir, "gemma", out)
  loaded = library_load_params(out)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)
  B, L = 2, 20
  tokens = tokens_for(cfg, B, L)
  model = gm.nn.Transformer(config=official_config(gm, cfg), dtype=jnp.float32)
  out_logits = model.apply(
      {"params": loaded}, jnp.asarray(tokens),
      positions=jnp.broadcast_to(jnp.arange(L), (B, L)),
      attention_mask=jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (B, L, L)))
  theirs = np.asarray(out_logits.logits)
  err = rel_err(run_maxgemma(cfg.replace(dtype="float32"), params, tokens), theirs)
  print(f"gemma {preset}: max relative logit difference {err:.2e}")
  assert err < TOLERANCE


def test_import_of_library_saved_nested_checkpoint(tmp_path):
  _, cfg, params = make_workdir(str(tmp_path), "tiny_gemma2", vocab_size=512)
  path = str(tmp_path / "nested")
  import orbax.checkpoint as ocp  # noqa: PLC0415
  ckpt = ocp.StandardCheckpointer()  # what gm.ckpts.save_params does: nested layout, no config
  ckpt.save(path, params)
  ckpt.wait_until_finished()
  with pytest.raises(ValueError, match="--preset"):
    import_weights("gemma", path, str(tmp_path / "no_preset"))
  with pytest.raises(ValueError, match="embedder/input_embedding"):  # tiny_gemma3: other shapes
    import_weights("gemma", path, str(tmp_path / "wrong"), preset="tiny_gemma3")
  back = str(tmp_path / "back")
  import_weights("gemma", path, back, preset="tiny_gemma2")
  imported, cfg2, _ = load_params(back)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(stack_layers(params)), strict=True):
    np.testing.assert_array_equal(a, b)
