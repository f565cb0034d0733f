"""What a training mode optimises: the trainable parameters, the loss sums of a batch, its metrics.

An `Objective` is the one piece a new training mode gives `trainer.build`; the builder wraps it
in the shared chain (optimizer, sharded state, micro-batch accumulation, NaN/Inf guard, jit). It
says:

- which parameters are trained (`abstract_params`, `init_params`): logically annotated, so the
  rules table shards them;
- which frozen inputs the step also takes (`frozen_abstract`, `load_frozen`), e.g. a teacher's or a
  reference model's parameters: sharded by the same rules, passed to every step, never updated;
- what one batch looks like (`batch_spec`) and its normalising weight (`weight`);
- the sums of one (micro-)batch (`loss_sums`): the loss sum, the weight sum and named scalar
  float32 sums (`sums`) that add over micro-batches;
- the metrics made of those sums (`metrics`) and the held-out figures (`eval_sums`);
- whether training draws random numbers (`needs_rng`; then `train_sums` takes a key: LoRA's
  adapter dropout), while `loss_sums` and `eval_sums` stay deterministic.

`NextToken` (next-token cross-entropy) is the pretraining objective. Batches are dicts of [B, L]
arrays: `tokens`, `targets`, `positions`, `segment_ids`, `loss_weights`.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from maxgemma import loss as loss_lib
from maxgemma.model import flops
from maxgemma.model.config import ModelConfig
from maxgemma.model.gemma import Transformer
from maxgemma.trainer import state as state_lib

Batch = dict[str, jax.Array]
LossSums = tuple[jax.Array, jax.Array, dict[str, jax.Array]]


def token_batch_spec(global_batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a packed token batch (int32 ids, float32 loss weights)."""
  ints = jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32)
  return {"tokens": ints, "targets": ints, "positions": ints, "segment_ids": ints,
          "loss_weights": jax.ShapeDtypeStruct((global_batch, seq_len), jnp.float32)}


class Objective(abc.ABC):
  """The base of every objective: the model's own parameters, no frozen inputs, token batches.

  Subclasses set `sums` and define `loss_sums`, `metrics` and `eval_sums`.
  """

  sums: tuple[str, ...] = ()  # names of the scalar float32 sums `loss_sums` returns
  needs_rng: bool = False  # True: the train step calls `train_sums` with a key

  def __init__(self, model_cfg: ModelConfig):
    self.model_cfg = model_cfg

  def abstract_params(self) -> Any:
    """Boxed (logically annotated) shapes of the trained parameters."""
    return state_lib.abstract_params(self.model_cfg)

  def init_params(self, rng: jax.Array) -> Any:
    """Fresh trained parameters (unboxed), traced inside the sharded initialiser."""
    return state_lib.init_params(self.model_cfg, rng)

  def frozen_abstract(self) -> Any:
    """Boxed shapes of the frozen inputs every step takes (a pytree; `{}` for none)."""
    return {}

  def load_frozen(self, shardings: Any) -> Any:
    """The frozen inputs, placed in `shardings` (the tree `frozen_abstract` describes)."""
    return {}

  def batch_spec(self, global_batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch."""
    return token_batch_spec(global_batch, seq_len)

  def weight(self, batch: Batch) -> jax.Array:
    """The whole batch's normalising weight (known before the model runs; at least 1)."""
    return jnp.maximum(jnp.sum(batch["loss_weights"].astype(jnp.float32)), 1.0)

  def flops_per_token(self, seq_len: int) -> float:
    """Model FLOPs of one trained token (the MFU numerator): the trained model's forward and
    backward, plus the forward of any frozen model the step runs."""
    return flops.flops_per_token(self.model_cfg, seq_len)

  @abc.abstractmethod
  def loss_sums(self, params: Any, batch: Batch, frozen: Any) -> LossSums:
    """(loss_sum, weight_sum, {name: sum for name in self.sums}) of one (micro-)batch."""
    raise NotImplementedError

  def train_sums(self, params: Any, batch: Batch, frozen: Any, rng: jax.Array) -> LossSums:
    """`loss_sums` of a training (micro-)batch drawing on `rng` (a key of the seed, the step and
    the micro-batch index alone); called instead of `loss_sums` when `needs_rng`."""
    return self.loss_sums(params, batch, frozen)

  @abc.abstractmethod
  def metrics(self, sums: dict[str, jax.Array], denom: jax.Array) -> dict[str, jax.Array]:
    """The objective's step metrics from the batch's sums and its weight."""
    raise NotImplementedError

  @abc.abstractmethod
  def eval_sums(self, params: Any, batch: Batch, frozen: Any) -> dict[str, jax.Array]:
    """`{"nll_sum", "weight"}` of a held-out batch."""
    raise NotImplementedError


class NextToken(Objective):
  """Next-token cross-entropy (plus PaLM's z-loss), from full logits or in `loss_chunk` pieces."""

  sums = ("nll_sum", "z_loss_sum", "correct")

  def __init__(self, model_cfg: ModelConfig, *, z_loss: float = 0.0, loss_chunk: int = 0):
    super().__init__(model_cfg)
    self.z_loss, self.loss_chunk = float(z_loss), int(loss_chunk)

  def _sums(self, params: Any, batch: Batch, z_loss: float, loss_chunk: int) -> LossSums:
    model = Transformer(self.model_cfg)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    if loss_chunk:
      hidden_BLD = model.apply({"params": params}, *args, return_hidden=True)
      return loss_lib.chunked_cross_entropy(
          hidden_BLD, params["embedder"]["input_embedding"], batch["targets"],
          batch["loss_weights"], chunk_size=loss_chunk,
          final_softcap=self.model_cfg.final_logit_softcap, z_loss=z_loss,
          dtype=jnp.dtype(self.model_cfg.dtype), flatten=self.model_cfg.flatten_matmuls)
    logits_BLV = model.apply({"params": params}, *args)
    return loss_lib.cross_entropy(logits_BLV, batch["targets"], batch["loss_weights"], z_loss)

  def loss_sums(self, params: Any, batch: Batch, frozen: Any) -> LossSums:
    return self._sums(params, batch, self.z_loss, self.loss_chunk)

  def metrics(self, sums: dict[str, jax.Array], denom: jax.Array) -> dict[str, jax.Array]:
    return {"loss": sums["nll_sum"] / denom, "z_loss": sums["z_loss_sum"] / denom,
            "accuracy": sums["correct"] / denom}

  def eval_sums(self, params: Any, batch: Batch, frozen: Any) -> dict[str, jax.Array]:
    _, weight, sums = self._sums(params, batch, 0.0, 0)  # full logits, no z-loss
    return {"nll_sum": sums["nll_sum"], "weight": weight}


def from_config(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig) -> Objective:
  """The objective a config trains."""
  return NextToken(model_cfg, z_loss=float(cfg.optim.z_loss),
                   loss_chunk=int(cfg.train.get("loss_chunk", 0)))
