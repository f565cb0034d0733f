"""Low-rank adapters (LoRA, Hu et al. 2021) on chosen projections of a frozen Gemma.

Shape letters: R rank; the other dimensions keep their parameter's logical names.

A target (`q`, `k`, `v`, `o`, `gate`, `up`, `down`) picks one projection of every layer. Its
weight W, read as a map from its input dimensions to its output dimensions, gets the update
`(alpha / rank) * A @ B`: A [input dims..., R] and B [R, output dims...], both annotated with the
weight's own logical axes (the rank axis is unsharded), with a leading `layers` axis in the
scanned model. A starts random and B at zero, so a fresh adapter leaves the model unchanged.

Only the adapters are trained (the `LoRA` objective's parameters, hence the only optimizer state
and the only parameters in checkpoints); the base model is a frozen input in its own dtype.

Two ways to run the adapted model, equal up to float rounding:

- merged (`merge`): W + (alpha / rank) * A @ B, then the ordinary model. Training with dropout 0,
  evaluation, and the merged export.
- unmerged (`unmerged`, `with_adapters`): y = x W + (alpha / rank) * dropout(x) A B, PEFT's LoRA,
  dropout on the adapter's input only. Training with `config.lora.dropout` > 0. A flax method
  interceptor adds the low-rank path to the adapted projections (`Einsum.__call__` of the
  attention, `FeedForward.project`); the adapters (and each one's dropout keys, one per layer)
  ride in the parameter tree under a `lora` entry of their module, so the scan over layers slices
  them like the weights and the model itself stays as it is.

A run records the base checkpoint it trains on (`LoRA.pin_base`: the base's workdir and step, in
every checkpoint's meta as `lora_base`); a resumed run and the merged export load that step.
"""

from __future__ import annotations

import string
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from maxgemma.model.layers import Einsum, FeedForward
from maxgemma.trainer import state as state_lib
from maxgemma.trainer.objective import Batch, LossSums, Objective

LORA = "lora"  # the entry of an adapted module's parameters that holds its adapters (unmerged)

# target -> (input logical axes, ((parameter module, index along its stacking axis or None), ...))
TARGETS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, int | None], ...]]] = {
    "q": (("embed",), (("q_einsum", None), ("qkv_einsum", 0))),
    "k": (("embed",), (("kv_einsum", 0), ("qkv_einsum", 1))),
    "v": (("embed",), (("kv_einsum", 1), ("qkv_einsum", 2))),
    "o": (("heads", "head_dim"), (("attn_vec_einsum", None),)),
    "gate": (("embed",), (("gating_einsum", 0),)),
    "up": (("embed",), (("gating_einsum", 1),)),
    "down": (("mlp",), (("linear", None),)),
}


def parse_targets(targets: str | tuple[str, ...]) -> tuple[str, ...]:
  """`"q,v"` -> ("q", "v"); refuses an unknown name in one line."""
  names = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)
                if t.strip())
  bad = [t for t in names if t not in TARGETS]
  if bad or not names:
    raise ValueError(f"config.lora.targets={','.join(names)!r}: {bad or 'nothing'} names no "
                     f"projection; choose from {','.join(TARGETS)}")
  return names


def _sites(boxed_params: Any, targets: tuple[str, ...]) -> list[tuple[tuple[str, ...], str, Any]]:
  """(path to the weight, target, its boxed leaf) for every adapted weight."""
  flat = jax.tree_util.tree_flatten_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  sites = []
  for path, leaf in flat:
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    module = keys[-2] if keys[-1] in ("w",) else keys[-1]
    for target in targets:
      if any(module == name for name, _ in TARGETS[target][1]):
        sites.append((keys, target, leaf))
  missing = [t for t in targets if t not in {t for _, t, _ in sites}]
  if missing:
    raise ValueError(f"config.lora.targets: {','.join(missing)} names no parameter of this model; "
                     "drop it from config.lora.targets")
  return sites


def _layout(keys: tuple[str, ...], target: str, names: tuple) -> tuple[int | None, list[int],
                                                                       list[int]]:
  """(stacking dimension or None, input dimensions, output dimensions) of the weight at `keys`,
  excluding the leading `layers` dimension, which both adapter factors keep."""
  module = keys[-2] if keys[-1] == "w" else keys[-1]
  inputs, modules = TARGETS[target]
  index = dict(modules)[module]
  dims = [i for i, n in enumerate(names) if n != "layers"]
  stack = None
  if index is not None:
    stack = next(i for i in dims if names[i] is None)
  rest = [i for i in dims if i != stack]
  return stack, [i for i in rest if names[i] in inputs], [i for i in rest if names[i] not in inputs]


def _set(tree: dict, keys: tuple[str, ...], value: Any) -> None:
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def _get(tree: Any, keys: tuple[str, ...]) -> Any:
  for k in keys:
    tree = tree[k]
  return tree


def abstract_adapters(boxed_params: Any, targets: tuple[str, ...], rank: int,
                      dtype=jnp.float32) -> dict:
  """Boxed shapes of the adapters: `{<weight path>: {target: {"a", "b"}}}`."""
  if rank < 1:
    raise ValueError(f"config.lora.rank must be at least 1, got {rank}")
  out: dict = {}
  for keys, target, leaf in _sites(boxed_params, targets):
    shape, names = leaf.value.shape, tuple(leaf.names)
    stack, ins, outs = _layout(keys, target, names)
    lead = tuple(i for i, n in enumerate(names) if n == "layers")

    def box(dims, pre, post, shape=shape, names=names, lead=lead):
      return nn.LogicallyPartitioned(
          jax.ShapeDtypeStruct(tuple(shape[i] for i in lead) + pre
                               + tuple(shape[i] for i in dims) + post, dtype),
          tuple(names[i] for i in lead) + ("lora_rank",) * len(pre)
          + tuple(names[i] for i in dims) + ("lora_rank",) * len(post))

    _set(out, keys + (target,), {"a": box(ins, (), (rank,)), "b": box(outs, (rank,), ())})
  return out


def init_adapters(abstract: dict, rng: jax.Array) -> dict:
  """A ~ N(0, 1/fan_in) (fan_in: the size of its input dimensions), B = 0 (unboxed)."""
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=is_box)
  out = []
  for (path, box), key in zip(flat, jax.random.split(rng, len(flat)), strict=True):
    x = box.value
    if str(getattr(path[-1], "key", "")) == "b":
      out.append(jnp.zeros(x.shape, x.dtype))
      continue
    fan_in = 1
    for d, name in zip(x.shape[:-1], box.names[:-1], strict=True):
      fan_in *= 1 if name == "layers" else d
    out.append((jax.random.normal(key, x.shape, jnp.float32) / fan_in ** 0.5).astype(x.dtype))
  return jax.tree.unflatten(treedef, out)


def merge(base: Any, adapters: dict, boxed_base: Any, *, alpha: float, rank: int) -> Any:
  """The base parameters with every adapter's `(alpha / rank) * A @ B` added (in the base dtype)."""
  scale = float(alpha) / float(rank)
  merged = jax.tree.map(lambda x: x, base)
  targets = tuple(sorted({keys[-1] for keys in _adapter_paths(adapters)}))
  for keys, target, leaf in _sites(boxed_base, targets):
    names = tuple(leaf.names)
    stack, ins, outs = _layout(keys, target, names)
    ad = _get(adapters, keys + (target,))
    lead = [i for i, n in enumerate(names) if n == "layers"]
    letters = iter(string.ascii_letters.replace("z", ""))
    sym = {i: next(letters) for i in range(len(names))}
    spec_a = "".join(sym[i] for i in lead + ins) + "z"
    spec_b = "".join(sym[i] for i in lead) + "z" + "".join(sym[i] for i in outs)
    out_dims = [i for i in range(len(names)) if i != stack]
    spec_out = "".join(sym[i] for i in out_dims)
    w = jnp.asarray(_get(merged, keys))
    delta = scale * jnp.einsum(f"{spec_a},{spec_b}->{spec_out}", ad["a"].astype(jnp.float32),
                               ad["b"].astype(jnp.float32))
    if stack is not None:
      index = dict(TARGETS[target][1])[keys[-2] if keys[-1] == "w" else keys[-1]]
      w = w.at[(slice(None),) * stack + (index,)].add(delta.astype(w.dtype))
    else:
      w = w + delta.astype(w.dtype)
    _set(merged, keys, w)
  return merged


def _adapter_paths(adapters: dict) -> list[tuple[str, ...]]:
  """The paths `(<weight path>..., target)` of every adapter."""
  flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
  return sorted({tuple(str(getattr(k, "key", k)) for k in p[:-1]) for p, _ in flat})


def check_dropout(rate: float) -> float:
  """`rate` if it is in [0, 1); else one line naming config.lora.dropout."""
  rate = float(rate)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"config.lora.dropout={rate}: the adapters' input dropout rate must be in "
                     "[0, 1) (0: no dropout)")
  return rate


def keep_mask(key_data: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """Which entries dropout keeps (True with probability 1 - rate), drawn from a raw key."""
  return jax.random.bernoulli(jax.random.wrap_key_data(key_data), 1.0 - rate, shape)


def with_adapters(base: Any, adapters: dict, rng: jax.Array | None = None) -> Any:
  """The base parameters with each adapter placed beside its weight, `<module>/lora/<target>`:
  `{"a", "b"}`, plus `"key"` (raw dropout keys, one per layer in the scanned tree) when `rng` is
  given. The unmerged model reads them there (`unmerged`)."""
  tree = jax.tree.map(lambda x: x, base)
  for i, path in enumerate(_adapter_paths(adapters)):
    keys, target = path[:-1], path[-1]
    ad = dict(_get(adapters, path))
    if rng is not None:
      key = jax.random.fold_in(rng, i)
      if keys[0] == "layers":  # scanned: a key per layer, sliced by the scan as the weights are
        key = jax.random.split(key, ad["a"].shape[0])
      ad["key"] = jax.random.key_data(key)
    _set(tree, keys[:-1] + (LORA, target), ad)
  return tree


def _low_rank(x: jax.Array, ad: dict, scale: float, rate: float) -> jax.Array:
  """scale * dropout(x) A B: x [B, L, input dims...] -> [B, L, output dims...] in x's dtype."""
  if "key" in ad and rate > 0:
    x = jnp.where(keep_mask(ad["key"], rate, x.shape), x / jnp.asarray(1.0 - rate, x.dtype),
                  jnp.zeros((), x.dtype))
  a, b = ad["a"].astype(x.dtype), ad["b"].astype(x.dtype)
  xa = jnp.tensordot(x, a, axes=a.ndim - 1)
  if xa.ndim == 3:
    xa = nn.with_logical_constraint(xa, ("act_batch", "act_length", None))
  return jnp.tensordot(xa, b, axes=1) * jnp.asarray(scale, x.dtype)


def _target_of(weight: str, index: int | None, present: Any) -> str | None:
  return next((t for t in present if (weight, index) in TARGETS[t][1]), None)


def unmerged(*, alpha: float, rank: int, dropout: float = 0.0):
  """A context in which the model adds each adapter's `(alpha / rank) * dropout(x) A B` to its
  projection's output, for the modules whose parameters hold adapters (`with_adapters`); dropout
  applies where the adapters carry keys. Other models run inside it (a DPO reference, a
  distillation teacher) are left as they are."""
  scale, rate = float(alpha) / float(rank), check_dropout(dropout)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, Einsum) and context.method_name == "__call__":
      if not module.has_variable("params", LORA):
        return next_fun(*args, **kwargs)
      x = args[1] if len(args) > 1 else kwargs["x"]
      y = next_fun(*args, **kwargs)
      for target, ad in module.get_variable("params", LORA).items():
        index = dict(TARGETS[target][1])[module.name]
        delta = _low_rank(x, ad, scale, rate).astype(y.dtype)
        y = y + delta if index is None else y.at[index].add(delta)
      return y
    if isinstance(module, FeedForward) and context.method_name == "project":
      y = next_fun(*args, **kwargs)
      if not module.has_variable("params", LORA):
        return y
      weight, index, _, x, _ = args
      adapters = module.get_variable("params", LORA)
      target = _target_of(weight, index, adapters)
      if target is None:
        return y
      return y + _low_rank(x, adapters[target], scale, rate).astype(y.dtype)
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(intercept)


class LoRA(Objective):
  """Any objective, trained through low-rank adapters on a frozen base.

  Parameters: the adapters. Frozen inputs: `{"base": the base parameters, **the inner
  objective's}`. Batches, sums and metrics are the inner objective's. With `dropout` 0 every step
  runs the merged model; with `dropout` > 0 training runs the unmerged one, dropping the
  adapters' inputs with the step's key (`train_sums`), and evaluation the merged one.

  `base` is the base's workdir ("" = a fresh init), `load_base(shardings, step)` its parameters
  at `step` (None: the latest); `pin_base` fixes the step.
  """

  def __init__(self, inner: Objective, *, targets: str | tuple[str, ...], rank: int,
               alpha: float, dropout: float = 0.0, load_base=None, base: str = ""):
    super().__init__(inner.model_cfg)
    self.dropout = check_dropout(dropout)
    self.needs_rng = self.dropout > 0
    self.inner, self.targets = inner, parse_targets(targets)
    self.rank, self.alpha = int(rank), float(alpha)
    self.sums = inner.sums
    self._load_base = load_base
    self.base, self.base_step = str(base), None
    self._boxed_base = state_lib.abstract_params(self.model_cfg)
    if "base" in inner.frozen_abstract():
      raise ValueError("the inner objective already has a frozen input named 'base'")
    self._abstract = abstract_adapters(self._boxed_base, self.targets, self.rank)

  def abstract_params(self) -> Any:
    return self._abstract

  def init_params(self, rng: jax.Array) -> Any:
    return init_adapters(self._abstract, rng)

  def frozen_abstract(self) -> Any:
    return {"base": self._boxed_base, **self.inner.frozen_abstract()}

  def load_frozen(self, shardings: Any) -> Any:
    if self._load_base is None:
      raise ValueError("the LoRA objective has no base model: pass load_base (a function of the "
                       "base shardings returning its parameters)")
    rest = {k: v for k, v in shardings.items() if k != "base"}
    return {"base": self._load_base(shardings["base"], self.base_step),
            **self.inner.load_frozen(rest)}

  def pin_base(self, recorded: dict | None) -> dict:
    """Fixes the base checkpoint the run trains on: `recorded` (a checkpoint meta's `lora_base`,
    `{"workdir", "step"}`, of the run being resumed), else the base's latest; returns the meta
    entry to record (`{}` for a fresh-init base). Refuses in one line a recorded base that is
    not `config.lora.base`, or whose step is gone. A DPO reference that is the policy's start
    (config.dpo.reference empty) is pinned to the same step."""
    if not self.base:
      return {}
    from maxgemma.trainer import frozen  # noqa: PLC0415

    key = f"config.lora.base={self.base}"
    if recorded:
      step = int(recorded["step"])
      if str(recorded["workdir"]) != self.base:
        raise ValueError(f"{key}, but this LoRA run trained on {recorded['workdir']} at step "
                         f"{step}; set config.lora.base back to it, or train in a new workdir")
      from maxgemma.checkpoint import Checkpointer  # noqa: PLC0415
      ckpt = Checkpointer(self.base, read_only=True)
      try:
        steps = ckpt.all_steps()
      finally:
        ckpt.close()
      if step not in steps:
        raise FileNotFoundError(f"{key}: step {step}, the base checkpoint this LoRA run trained "
                                f"on, is gone from {self.base} (steps there: {steps or 'none'}); "
                                "bring it back, or train in a new workdir")
    else:
      step, _ = frozen.latest_checkpoint(self.base, key)
    self.base_step = step
    if getattr(self.inner, "reference_is_start", False):  # DPO's reference: the same base
      self.inner.reference_step = step
    return {"lora_base": {"workdir": self.base, "step": step}}

  def merged(self, adapters: Any, base: Any) -> Any:
    """The base parameters with the adapters merged in."""
    return merge(jax.lax.stop_gradient(base), adapters, self._boxed_base, alpha=self.alpha,
                 rank=self.rank)

  def _split(self, params: Any, frozen: Any) -> tuple[Any, Any]:
    return self.merged(params, frozen["base"]), {k: v for k, v in frozen.items() if k != "base"}

  def flops_per_token(self, seq_len: int) -> float:
    return self.inner.flops_per_token(seq_len)

  def batch_spec(self, global_batch: int, seq_len: int):
    return self.inner.batch_spec(global_batch, seq_len)

  def weight(self, batch: Batch) -> jax.Array:
    return self.inner.weight(batch)

  def loss_sums(self, params: Any, batch: Batch, frozen: Any) -> LossSums:
    merged, rest = self._split(params, frozen)
    return self.inner.loss_sums(merged, batch, rest)

  def unmerged_sums(self, params: Any, batch: Batch, frozen: Any,
                    rng: jax.Array | None) -> LossSums:
    """The inner objective's sums through the unmerged adapters, dropping their inputs with
    `rng` (None: no dropout)."""
    tree = with_adapters(jax.lax.stop_gradient(frozen["base"]), params,
                         None if rng is None else jax.random.fold_in(rng, 0x4C6F))
    rest = {k: v for k, v in frozen.items() if k != "base"}
    with unmerged(alpha=self.alpha, rank=self.rank, dropout=self.dropout):
      return self.inner.loss_sums(tree, batch, rest)

  def train_sums(self, params: Any, batch: Batch, frozen: Any, rng: jax.Array) -> LossSums:
    if not self.dropout:
      return self.loss_sums(params, batch, frozen)
    return self.unmerged_sums(params, batch, frozen, rng)

  def metrics(self, sums, denom):
    return self.inner.metrics(sums, denom)

  def eval_sums(self, params: Any, batch: Batch, frozen: Any) -> dict[str, jax.Array]:
    merged, rest = self._split(params, frozen)
    return self.inner.eval_sums(merged, batch, rest)


def enabled(cfg: ml_collections.ConfigDict) -> bool:
  """Whether `cfg` trains LoRA adapters (`config.lora.targets` set)."""
  return bool(cfg.get("lora", {}).get("targets", ""))


def wrap(cfg: ml_collections.ConfigDict, inner: Objective) -> LoRA:
  """`inner` trained through the adapters `cfg.lora` describes, on the base `cfg.lora.base` (a
  workdir's checkpoint, the one `pin_base` fixes; "" = the weights a fresh run with `train.seed`
  starts from)."""
  from maxgemma.trainer.dpo import params_loader  # noqa: PLC0415

  c = cfg.lora
  return LoRA(inner, targets=str(c.targets), rank=int(c.rank), alpha=float(c.alpha),
              dropout=float(c.dropout), base=str(c.base),
              load_base=params_loader(inner.model_cfg, str(c.base), int(cfg.train.seed)))


def pin_base(objective: Objective, run_meta: dict | None) -> dict:
  """`objective.pin_base` with the `lora_base` that `run_meta` (the meta of the checkpoint a run
  resumes from, or None) records, if `objective` is LoRA; the meta entry to save (`{}` if none)."""
  if not isinstance(objective, LoRA):
    return {}
  return objective.pin_base((run_meta or {}).get("lora_base"))
