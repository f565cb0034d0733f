"""LoRA: merged weights against float64 numpy per target, zero-initialised adapters leave the
logits unchanged, the optimizer state is a small fraction of full fine-tuning's (counted in
bytes), only adapters are trained and checkpointed, and bad targets are refused in one line."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from maxgemma import checkpoint, lora, sharding
from maxgemma.model.gemma import Transformer
from maxgemma.model.presets import get_preset
from maxgemma.trainer import state as state_lib
from maxgemma.trainer.build import build
from maxgemma.trainer.loop import train
from maxgemma.trainer.objective import NextToken
from tests.train_utils import tiny_config

ALL = tuple(lora.TARGETS)


def random_adapters(abstract, seed):
  """Adapters with both factors random (B too), so merging changes every adapted weight."""
  shapes = nn.unbox(abstract)
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [rng.normal(0, 0.3, x.shape).astype(np.float32)
                                      for x in leaves])


def expected_outputs(target, module, W, A, B, scale, x):
  """Layer-0 outputs x -> y of the adapted projection, float64, two ways: through the merged
  weight (`None` here: the caller passes it) and through W plus the low-rank path."""
  W, A, B, x = (np.asarray(v, np.float64) for v in (W, A, B, x))
  idx = {"q": 0, "k": 1, "v": 2}.get(target) if module == "qkv_einsum" else \
      {"k": 0, "v": 1, "gate": 0, "up": 1}.get(target)
  w = W[idx] if idx is not None else W
  if module in ("q_einsum", "kv_einsum", "qkv_einsum"):  # [N, D, H]; A [D, R]; B [R, N, H]
    return np.einsum("d,ndh->nh", x, w) + scale * np.einsum("d,dr,rnh->nh", x, A, B)
  if module == "attn_vec_einsum":  # [N, H, D]; A [N, H, R]; B [R, D]
    return np.einsum("nh,nhd->d", x, w) + scale * np.einsum("nh,nhr,rd->d", x, A, B)
  if module == "gating_einsum":  # [D, F]; A [D, R]; B [R, F]
    return x @ w + scale * (x @ A) @ B
  return x @ w + scale * (x @ A) @ B  # linear [F, D]; A [F, R]; B [R, D]


def merged_output(target, module, Wm, x):
  Wm, x = np.asarray(Wm, np.float64), np.asarray(x, np.float64)
  idx = {"q": 0, "k": 1, "v": 2}.get(target) if module == "qkv_einsum" else \
      {"k": 0, "v": 1, "gate": 0, "up": 1}.get(target)
  w = Wm[idx] if idx is not None else Wm
  if module in ("q_einsum", "kv_einsum", "qkv_einsum"):
    return np.einsum("d,ndh->nh", x, w)
  if module == "attn_vec_einsum":
    return np.einsum("nh,nhd->d", x, w)
  return x @ w


@pytest.mark.parametrize("preset", ["tiny_gemma2", "tiny_gemma1_mha"])
def test_merge_matches_numpy_low_rank_path(preset):
  cfg = get_preset(preset)
  boxed = state_lib.abstract_params(cfg)
  base = jax.device_get(state_lib.init_params(cfg, jax.random.key(0)))
  rank, alpha = 3, 6.0
  adapters = random_adapters(lora.abstract_adapters(boxed, ALL, rank), 1)
  merged = jax.device_get(lora.merge(base, adapters, boxed, alpha=alpha, rank=rank))
  rng = np.random.default_rng(2)
  checked = set()
  for module_path, targets in (
      (("layers", "attn", "q_einsum", "w"), ("q",)), (("layers", "attn", "kv_einsum", "w"),
                                                      ("k", "v")),
      (("layers", "attn", "qkv_einsum", "w"), ("q", "k", "v")),
      (("layers", "attn", "attn_vec_einsum", "w"), ("o",)),
      (("layers", "mlp", "gating_einsum"), ("gate", "up")), (("layers", "mlp", "linear"),
                                                              ("down",))):
    node = base
    try:
      for k in module_path:
        node = node[k]
    except KeyError:
      continue
    module = module_path[-2] if module_path[-1] == "w" else module_path[-1]
    W, Wm = node, merged
    for k in module_path:
      Wm = Wm[k]
    ad = adapters
    for k in module_path:
      ad = ad[k]
    for target in targets:
      A, B = ad[target]["a"][0], ad[target]["b"][0]  # layer 0
      x = rng.normal(size=A.shape[:-1])
      want = expected_outputs(target, module, W[0], A, B, alpha / rank, x)
      np.testing.assert_allclose(merged_output(target, module, Wm[0], x), want, rtol=1e-4,
                                 atol=1e-4)
      checked.add(target)
  assert checked == set(ALL)


def test_zero_adapters_leave_logits_unchanged():
  cfg = get_preset("tiny_gemma2")
  boxed = state_lib.abstract_params(cfg)
  base = state_lib.init_params(cfg, jax.random.key(0))
  adapters = lora.init_adapters(lora.abstract_adapters(boxed, ALL, 4), jax.random.key(1))
  flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
  assert all(np.all(np.asarray(x) == 0) == (str(p[-1].key) == "b") for p, x in flat)
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
  model = Transformer(cfg)
  before = model.apply({"params": base}, tokens)
  after = model.apply({"params": lora.merge(base, adapters, boxed, alpha=16.0, rank=4)}, tokens)
  np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def opt_state_bytes(setup) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state["opt_state"]))


def test_optimizer_state_is_a_small_fraction_of_full_fine_tuning():
  mesh = sharding.make_mesh(tiny_config().mesh)
  sizes = {}
  for name, overrides in (("full", {}), ("lora", {"lora.targets": ",".join(ALL),
                                                  "lora.rank": 8})):
    cfg = tiny_config(**{"model.preset": "gemma2_2b", "train.seq_len": 64, **overrides})
    setup = build(cfg, mesh)
    sizes[name] = opt_state_bytes(setup)
    if name == "lora":
      paths = jax.tree_util.tree_flatten_with_path(setup.abstract_state["params"])[0]
      assert {str(p[-1].key) for p, _ in paths} == {"a", "b"}
      frozen = jax.tree.leaves(setup.frozen_abstract["base"])
      assert len(frozen) > 0
  ratio = sizes["lora"] / sizes["full"]
  print(f"gemma2_2b opt state: full {sizes['full'] / 2**30:.2f} GiB, LoRA r=8 all targets "
        f"{sizes['lora'] / 2**20:.1f} MiB, ratio {ratio:.4%}")
  assert ratio <= 0.02



def test_adapters_are_sharded_over_fsdp_and_train_as_on_one_device():
  """LoRA through the builder on fsdp 8 gives the losses of one device (tests/test_dpo.py runs
  LoRA on fsdp 2 x tensor 4), and each adapter is split 8 ways: the rank over fsdp where its
  weight leaves fsdp free (e.g. the B of `up`, [layers, rank, mlp]), so ZeRO-3 shards the
  adapters' optimizer state too."""
  from tests import test_parallelism

  def lora_config(**mesh):
    cfg = test_parallelism.make_config(**mesh)
    cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha = ",".join(ALL), 8, 16.0
    return cfg

  want, _ = test_parallelism.run_losses(lora_config(), jax.devices()[:1], steps=3)
  got, _ = test_parallelism.run_losses(lora_config(ici_fsdp=8), jax.devices(), steps=3)
  np.testing.assert_allclose(got, want, rtol=test_parallelism.TOLERANCE)
  setup = build(lora_config(ici_fsdp=8), sharding.make_mesh(lora_config(ici_fsdp=8).mesh))
  flat = jax.tree_util.tree_flatten_with_path(setup.shardings["params"])[0]
  abstract = jax.tree.leaves(setup.abstract_state["params"])
  for (path, s), x in zip(flat, abstract, strict=True):
    shard = s.shard_shape(x.shape)
    assert np.prod(shard) * 8 == np.prod(x.shape), (jax.tree_util.keystr(path), x.shape, shard)

def test_bad_targets_one_line():
  with pytest.raises(ValueError, match="config.lora.targets") as e:
    lora.parse_targets("q,qq")
  assert "\n" not in str(e.value) and "qq" in str(e.value)
  boxed = state_lib.abstract_params(get_preset("tiny_gemma2"))
  with pytest.raises(ValueError, match="names no parameter") as e:
    lora.abstract_adapters({"embedder": boxed["embedder"]}, ("q",), 4)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="config.lora.dropout"):
    lora.LoRA(NextToken(get_preset("tiny_gemma2")), targets="q", rank=2, alpha=2.0, dropout=0.1)


def test_lora_run_trains_and_checkpoints_only_adapters(tmp_path):
  cfg = tiny_config(**{"train.steps": 6, "checkpoint.every": 6, "lora.targets": "q,v,down",
                       "lora.rank": 4, "optim.learning_rate": 3e-3})
  last = train(cfg, str(tmp_path))
  params = checkpoint.load_params(str(tmp_path))[0]
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  assert paths and {str(p[-1].key) for p, _ in paths} == {"a", "b"}
  assert {str(p[-2].key) for p, _ in paths} == {"q", "v", "down"}
  b_leaves = [x for p, x in paths if str(p[-1].key) == "b"]
  assert any(np.any(np.asarray(x) != 0) for x in b_leaves)  # the adapters moved
  assert np.isfinite(last["loss"])
