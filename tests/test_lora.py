"""LoRA: merged weights against float64 numpy per target, zero-initialised adapters leave the
logits unchanged, the optimizer state is a small fraction of full fine-tuning's (counted in
bytes), only adapters are trained and checkpointed, and bad targets are refused in one line.

Dropout: the unmerged projections with a fixed key against float64 numpy of
x W + scale * (mask * x / (1 - p)) A B, the unmerged model without dropout against the merged
logits, dropout moving the losses and training on fsdp 2 x tensor 4 as on one device, a rate
outside [0, 1) refused in one line. (tests/test_sft.py resumes a LoRA run with dropout exactly.)
The base a run trains on is pinned to the step it started from, for the resumed run and the
merged export."""

from __future__ import annotations

import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from maxgemma import checkpoint, lora, sample, sharding
from maxgemma import config as config_lib
from maxgemma.convert import peft_format
from maxgemma.convert.checkpoint_reader import CheckpointReader
from maxgemma.model.gemma import Transformer
from maxgemma.model.layers import Einsum, FeedForward
from maxgemma.model.presets import get_preset
from maxgemma.trainer import state as state_lib
from maxgemma.trainer.build import build
from maxgemma.trainer.loop import train
from maxgemma.trainer.objective import NextToken
from tests.train_utils import set_keys, tiny_config

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
  base = jax.device_get(jax.jit(lambda: state_lib.init_params(cfg, jax.random.key(0)))())
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
  base = jax.jit(lambda: state_lib.init_params(cfg, jax.random.key(0)))()
  adapters = lora.init_adapters(lora.abstract_adapters(boxed, ALL, 4), jax.random.key(1))
  flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
  assert all(np.all(np.asarray(x) == 0) == (str(p[-1].key) == "b") for p, x in flat)
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
  apply = jax.jit(Transformer(cfg).apply)
  before = apply({"params": base}, tokens)
  after = apply({"params": lora.merge(base, adapters, boxed, alpha=16.0, rank=4)}, tokens)
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
  # Dropout (the unmerged adapters, a key per step): the masks do not depend on the layout, so
  # fsdp 2 x tensor 4 gives one device's losses, which differ from dropout 0's.
  dropped = lambda **mesh: test_parallelism.run_losses(  # noqa: E731
      set_keys(lora_config(**mesh), **{"lora.dropout": 0.3}), jax.devices()[:8 if mesh else 1],
      steps=3)[0]
  one = dropped()
  np.testing.assert_allclose(dropped(ici_fsdp=2, ici_tensor=4), one,
                             rtol=test_parallelism.TOLERANCE)
  assert one[0] == want[0]  # step 0: B = 0, so the adapters (dropped or not) change nothing
  assert np.all(np.abs(one[1:] - want[1:]) > 1e-4), (one, want)
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
  for rate in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match=r"config.lora.dropout=.*\[0, 1\)") as e:
      lora.LoRA(NextToken(get_preset("tiny_gemma2")), targets="q", rank=2, alpha=2.0,
                dropout=rate)
    assert "\n" not in str(e.value)
  assert lora.LoRA(NextToken(get_preset("tiny_gemma2")), targets="q", rank=2, alpha=2.0,
                   dropout=0.1).needs_rng


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


class Projections(nn.Module):
  """The adapted projections of one layer, outside the model: q, k and v (two einsums), o and
  the feed-forward (gate, up, down)."""

  N, K, D, H, F = 2, 1, 6, 4, 10

  @nn.compact
  def __call__(self, x_BLD, h_BLNH):
    N, K, D, H = self.N, self.K, self.D, self.H
    init = nn.initializers.normal(0.5)
    f32 = jnp.float32
    q = Einsum((N, D, H), ("heads", "embed", "head_dim"), init, f32, f32,
               name="q_einsum")("BLD,NDH->BLNH", x_BLD)
    kv = Einsum((2, K, D, H), (None, "kv_heads", "embed", "head_dim"), init, f32, f32,
                name="kv_einsum")("BSD,CKDH->CBSKH", x_BLD)
    o = Einsum((N, H, D), ("heads", "head_dim", "embed"), init, f32, f32,
               name="attn_vec_einsum")("BLNH,NHD->BLD", h_BLNH)
    ffw = FeedForward(D, self.F, dtype=f32, param_dtype=f32, name="mlp")(x_BLD)
    return q, kv, o, ffw


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_unmerged_dropout_matches_numpy_on_every_projection():
  """y = x W + scale * (mask * x / (1 - p)) A B per target, float64 numpy against the
  interceptor, each target with its own mask (the feed-forward's down mask on its hidden)."""
  p, rank, alpha = 0.4, 3, 6.0
  scale = alpha / rank
  module = Projections()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, module.D)).astype(np.float32)
  h = rng.normal(size=(2, 5, module.N, module.H)).astype(np.float32)
  boxed = jax.eval_shape(module.init, jax.random.key(0), x, h)["params"]
  params = jax.jit(lambda: nn.unbox(module.init(jax.random.key(0), x, h)["params"]))()
  adapters = random_adapters(lora.abstract_adapters(boxed, ALL, rank), 1)
  tree = jax.jit(lambda p, a: lora.with_adapters(p, a, jax.random.key(5)))(params, adapters)
  with lora.unmerged(alpha=alpha, rank=rank, dropout=p):
    q, kv, o, ffw = jax.jit(lambda t: module.apply({"params": t}, x, h))(tree)

  f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731

  def dropped(where, target, inp):
    mask = np.asarray(lora.keep_mask(tree[where]["lora"][target]["key"], p, inp.shape))
    assert 0.3 < mask.mean() < 0.9, mask.mean()  # keeps about 1 - p
    return mask * f64(inp) / (1 - p)

  def low_rank(where, target, inp):
    ad = adapters[where]["w" if where != "mlp" else {"gate": "gating_einsum", "up":
                                                      "gating_einsum", "down": "linear"}[target]]
    A, B = f64(ad[target]["a"]), f64(ad[target]["b"])
    return scale * np.tensordot(np.tensordot(dropped(where, target, inp), A, A.ndim - 1), B, 1)

  W = lambda where, name="w": f64(params[where][name])  # noqa: E731
  checks = {
      "q": (q, np.einsum("bld,ndh->blnh", f64(x), W("q_einsum")) + low_rank("q_einsum", "q", x)),
      "k": (kv[0], np.einsum("bld,kdh->blkh", f64(x), W("kv_einsum")[0])
            + low_rank("kv_einsum", "k", x)),
      "v": (kv[1], np.einsum("bld,kdh->blkh", f64(x), W("kv_einsum")[1])
            + low_rank("kv_einsum", "v", x)),
      "o": (o, np.einsum("blnh,nhd->bld", f64(h), W("attn_vec_einsum"))
            + low_rank("attn_vec_einsum", "o", h))}
  gating = W("mlp", "gating_einsum")
  gate = f64(x) @ gating[0] + low_rank("mlp", "gate", x)
  up = f64(x) @ gating[1] + low_rank("mlp", "up", x)
  hidden = _gelu_tanh(gate) * up
  checks["ffw"] = (ffw, hidden @ W("mlp", "linear") + low_rank("mlp", "down", hidden))
  for name, (got, want) in checks.items():
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5, err_msg=name)
  keys = [np.asarray(tree[w]["lora"][t]["key"]) for w, t in (
      ("q_einsum", "q"), ("kv_einsum", "k"), ("kv_einsum", "v"), ("mlp", "gate"), ("mlp", "up"))]
  assert len({k.tobytes() for k in keys}) == len(keys)  # a mask of its own per target


@pytest.mark.parametrize("preset", ["tiny_gemma2", "tiny_gemma1_mha"])
def test_unmerged_without_dropout_gives_the_merged_logits(preset):
  """The scanned tiny model, every target (fused qkv for Gemma 1 MHA), float32: the unmerged
  path without dropout is the merged model within 1e-5, while the adapters move the logits and
  dropout moves them again."""
  cfg = get_preset(preset, dtype="float32")
  boxed = state_lib.abstract_params(cfg)
  base = jax.jit(lambda: state_lib.init_params(cfg, jax.random.key(0)))()
  shapes = nn.unbox(lora.abstract_adapters(boxed, ALL, 3))
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(1)
  adapters = jax.tree.unflatten(treedef, [rng.normal(0, 0.05, x.shape).astype(np.float32)
                                          for x in leaves])
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
  model = Transformer(cfg)

  @jax.jit
  def logits(base, adapters):
    merged = model.apply({"params": lora.merge(base, adapters, boxed, alpha=6.0, rank=3)}, tokens)
    with lora.unmerged(alpha=6.0, rank=3):
      unmerged = model.apply({"params": lora.with_adapters(base, adapters)}, tokens)
    with lora.unmerged(alpha=6.0, rank=3, dropout=0.3):
      dropped = model.apply({"params": lora.with_adapters(base, adapters, jax.random.key(3))},
                            tokens)
    return model.apply({"params": base}, tokens), merged, unmerged, dropped

  plain, merged, unmerged, dropped = map(np.asarray, logits(base, adapters))
  assert np.abs(merged - plain).max() > 0.1
  np.testing.assert_allclose(unmerged, merged, rtol=0, atol=1e-5)
  assert np.abs(dropped - merged).max() > 0.1


def _base_workdir(path: str, cfg, params, step: int) -> None:
  ckpt = checkpoint.Checkpointer(path, ml_collections.ConfigDict(dict(
      keep_last=0, keep_every=0, async_save=False)))
  ckpt.save(step, {"params": params}, model_cfg=config_lib.model_config(cfg), config=cfg)
  ckpt.close()


def test_a_lora_run_keeps_the_base_step_it_started_from(tmp_path):
  """The run records the base's workdir and latest step; once the base holds a newer checkpoint,
  the resumed run's base (and DPO's reference, when it is the base), the merged export and the
  sampler's merged model are still that step; a recorded step that is gone, or another
  config.lora.base, is refused in one line naming the base and the step."""
  base = str(tmp_path / "base")
  cfg = tiny_config(**{"lora.targets": "q,down", "lora.rank": 2, "lora.base": base,
                       "lora.dropout": 0.2})
  model_cfg = config_lib.model_config(cfg)
  params = jax.device_get(jax.jit(lambda: state_lib.init_params(model_cfg, jax.random.key(3)))())
  _base_workdir(base, cfg, params, 4)
  setup = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  recorded = lora.pin_base(setup.objective, None)
  assert recorded == {"lora_base": {"workdir": base, "step": 4}}
  _base_workdir(base, cfg, jax.tree.map(lambda x: x + 1.0, params), 9)  # the base moves on

  resumed = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  assert lora.pin_base(resumed.objective, recorded) == recorded
  loaded = jax.device_get(resumed.load_frozen()["base"])
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(x, y)  # step 4's weights, not step 9's
  fresh = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  assert lora.pin_base(fresh.objective, None)["lora_base"]["step"] == 9  # a new run: the latest
  dpo_run = build(tiny_config(**{"lora.targets": "q,down", "lora.rank": 2, "lora.base": base,
                                 "dpo.enabled": True}),
                  sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  lora.pin_base(dpo_run.objective, recorded)
  reference = jax.device_get(dpo_run.load_frozen()["reference"])  # DPO's reference: the base
  for x, y in zip(jax.tree.leaves(reference), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(x, y)

  run_dir = str(tmp_path / "run")
  ckpt = checkpoint.Checkpointer(run_dir, ml_collections.ConfigDict(dict(
      keep_last=0, keep_every=0, async_save=False)))
  adapters = random_adapters(setup.objective.abstract_params(), 2)
  ckpt.save(2, {"params": adapters}, config=cfg, model_cfg=model_cfg, extra_meta=recorded)
  ckpt.close()
  run = peft_format.lora_run(CheckpointReader(run_dir))
  assert (run.base, run.base_step) == (base, 4)
  assert peft_format.peft_config(run, "")["lora_dropout"] == 0.2
  assert peft_format.MergedReader(run).base.step == 4
  sampled, _, _ = sample.load_sharded(run_dir, None, sample.single_device_mesh(), "float32")
  merged = lora.merge(params, adapters, setup.objective._boxed_base, alpha=cfg.lora.alpha,
                      rank=cfg.lora.rank)  # onto step 4's weights
  for i in (0, model_cfg.num_layers - 1):
    for path in (("attn", "q_einsum", "w"), ("mlp", "linear")):
      np.testing.assert_allclose(np.asarray(lora._get(sampled[f"layer_{i}"], path)),
                                 np.asarray(lora._get(merged["layers"], path))[i], atol=1e-6)

  other = build(tiny_config(**{"lora.targets": "q,down", "lora.rank": 2,
                               "lora.base": str(tmp_path / "elsewhere")}),
                sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  with pytest.raises(ValueError, match=f"this LoRA run trained on {base} at step 4") as e:
    lora.pin_base(other.objective, recorded)
  assert "\n" not in str(e.value)
  shutil.rmtree(os.path.join(base, "checkpoints", "4"))
  with pytest.raises(FileNotFoundError, match=f"config.lora.base={base}: step 4, .* is gone") as e:
    lora.pin_base(resumed.objective, recorded)
  assert "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError, match=f"{base} at step 4") as e:
    peft_format.MergedReader(run)
  assert "\n" not in str(e.value)


def test_dropout_masks_are_the_steps_own():
  """Through the jitted train step, from the same adapters (B nonzero, so masks matter): the same
  step number gives the same loss bit for bit (what an exact resume needs), another step another
  loss (a mask per step)."""
  from tests import test_parallelism

  cfg = set_keys(test_parallelism.make_config(), **{"lora.targets": "q,v,down", "lora.rank": 4,
                                                    "lora.dropout": 0.3, "train.global_batch": 4})
  setup = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  start = jax.device_get(setup.create_state(seed=0))
  start["params"] = random_adapters(setup.objective.abstract_params(), 4)
  batch = next(test_parallelism.synthetic_batches(cfg, 1, setup.model_cfg.vocab_size))
  frozen = setup.load_frozen()

  def loss(step: int) -> float:
    state = jax.device_put({**start, "step": np.int32(step)}, setup.shardings)
    with setup.scope():
      return float(setup.train_step(state, sharding.global_batch(batch, setup.mesh),
                                    frozen)[1]["loss"])

  assert loss(3) == loss(3)
  assert len({loss(3), loss(4), loss(5)}) == 3
