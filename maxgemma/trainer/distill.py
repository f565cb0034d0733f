"""Online knowledge distillation (Gemma 2's pretraining recipe) as a trainer objective.

`config.distill.teacher` names a maxgemma workdir; its latest checkpoint's parameters are the
teacher, a frozen input of every step: sharded by the same rules table as the student, in its own
dtype, without optimizer state, run forward inside the jitted step. The student is trained on the
cross-entropy against the teacher's tempered next-token distribution, optionally mixed with the
next-token loss (`maxgemma.distill_loss` defines the sums; both models' logits are computed
`distill.loss_chunk` positions at a time). Teacher and student may differ in size and family but
must share the tokenizer and the vocabulary size, which `teacher_config` checks before anything
is built.

Offline distillation (Gemma 3's form) reads the teacher from storage instead: with
`config.data.teacher_topk` (directories written by `python -m maxgemma.teacher_logits`) every
batch carries K stored ids and weights per position (`teacher_ids`, `teacher_weights`) and
`OfflineDistill` trains the student on the cross-entropy to those weights, renormalised over the
stored ids (`distill_loss.chunked_topk_cross_entropy`, `distill.loss_chunk` positions at a time).
No teacher runs in the step and there are no frozen inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from maxgemma import distill_loss
from maxgemma.model import flops
from maxgemma.model.config import ModelConfig
from maxgemma.model.gemma import Transformer
from maxgemma.trainer import frozen
from maxgemma.trainer import state as state_lib
from maxgemma.trainer.objective import Batch, LossSums, Objective, token_batch_spec


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A teacher checkpoint: its workdir, step and model config (dtype as it will run)."""

  workdir: str
  step: int
  model_cfg: ModelConfig


def enabled(cfg: ml_collections.ConfigDict) -> bool:
  """Whether `cfg` trains by distillation: online (`distill.teacher`) or offline
  (`data.teacher_topk`, which wins when both are set)."""
  return bool(cfg.get("distill", {}).get("teacher", "")) or offline(cfg)


def offline(cfg: ml_collections.ConfigDict) -> bool:
  """Whether `cfg` trains by offline (stored top-k) distillation."""
  return bool(cfg.get("data", {}).get("teacher_topk", ""))


# ModelConfig fields that say how a model runs, not what it is: the teacher takes the student's.
_EXECUTION_FIELDS = ("attention_impl", "flatten_matmuls", "splash_block_q", "splash_block_kv",
                     "splash_block_kv_compute", "splash_block_q_dkv", "splash_block_kv_dkv",
                     "splash_block_kv_dkv_compute", "splash_block_q_dq", "splash_block_kv_dq",
                     "splash_fused_bwd")


def _runnable(cfg: ml_collections.ConfigDict, teacher: ModelConfig, student: ModelConfig,
              key: str) -> ModelConfig:
  """`teacher` in `distill.teacher_dtype`, run the way the student runs, checked against it."""
  if teacher.vocab_size != student.vocab_size:
    raise ValueError(f"{key}: the teacher's vocabulary ({teacher.vocab_size}) differs from the "
                     f"student's config.model.vocab_size ({student.vocab_size}); distillation "
                     "needs one tokenizer and one vocabulary size")
  changes = {f: getattr(student, f) for f in _EXECUTION_FIELDS}
  if cfg.distill.teacher_dtype:
    changes.update(dtype=str(cfg.distill.teacher_dtype), param_dtype=str(cfg.distill.teacher_dtype))
  try:
    return dataclasses.replace(teacher, **changes).validate(seq_len=int(cfg.train.seq_len))
  except ValueError as e:
    raise ValueError(f"{key}: the teacher cannot run this config: {e}") from None


def _checkpoint_teacher(cfg: ml_collections.ConfigDict, student: ModelConfig) -> Teacher:
  """The latest checkpoint of `cfg.distill.teacher`, its tokenizer checked against the student's."""
  from maxgemma.checkpoint import model_config_from_dict  # noqa: PLC0415

  workdir = str(cfg.distill.teacher)
  key = f"config.distill.teacher={workdir}"
  step, meta = frozen.latest_checkpoint(workdir, key)
  if not meta.get("model"):
    raise ValueError(f"{key}: checkpoint {step} records no model config; re-save it with "
                     "maxgemma.train or maxgemma.import_weights")
  teacher = model_config_from_dict(meta["model"])
  if teacher.vocab_size == student.vocab_size:
    frozen.check_same_tokenizer(cfg, workdir, meta, key, frozen="teacher", trained="student")
  return Teacher(workdir=workdir, step=int(step), model_cfg=_runnable(cfg, teacher, student, key))


def teacher_config(cfg: ml_collections.ConfigDict, student: ModelConfig) -> Teacher:
  """The teacher `cfg.distill.teacher` names, checked against the student: a complete checkpoint,
  the same tokenizer and vocabulary, a context at least `train.seq_len` long. It runs the way
  the student runs (attention kernel and tiles), in `distill.teacher_dtype` when that is set.

  With `distill.teacher_preset` the teacher's architecture is that preset's and the checkpoint
  is read (and checked to hold that architecture) only when the parameters are loaded, so
  `maxgemma.aot` compiles a distillation step without the teacher's checkpoint (`step` is -1).
  """
  if not cfg.distill.teacher_preset:
    return _checkpoint_teacher(cfg, student)
  from maxgemma.model import presets  # noqa: PLC0415

  key = f"config.distill.teacher_preset={cfg.distill.teacher_preset}"
  try:
    teacher = presets.get_preset(str(cfg.distill.teacher_preset))
  except ValueError as e:
    raise ValueError(f"{key}: {e}") from None
  return Teacher(workdir=str(cfg.distill.teacher), step=-1,
                 model_cfg=_runnable(cfg, teacher, student, key))


class OnlineDistill(Objective):
  """Cross-entropy of the student against a frozen teacher's tempered distribution.

  Frozen inputs: `{"teacher": params}`. Metrics: `loss` (the objective, z-loss excluded),
  `distill_loss` (cross-entropy to the teacher at the temperature), `kl` (KL to the teacher at the
  temperature), `agreement` (top-1 agreement), `next_token_loss`, `accuracy`, `z_loss`. Held-out
  batches give `nll_sum` and, at temperature 1, `kl_sum` and `agree`.
  """

  sums = distill_loss.AUX_KEYS

  def __init__(self, model_cfg: ModelConfig, teacher: Teacher, *, temperature: float = 1.0,
               alpha: float = 0.0, z_loss: float = 0.0, loss_chunk: int = 256,
               find_checkpoint: Callable[[], Teacher] | None = None):
    """`find_checkpoint` gives the checkpoint of a preset `teacher` (step -1) at load time."""
    super().__init__(model_cfg)
    self.teacher, self._find_checkpoint = teacher, find_checkpoint
    self.temperature, self.alpha, self.z_loss = float(temperature), float(alpha), float(z_loss)
    self.loss_chunk = int(loss_chunk)
    if self.loss_chunk <= 0:
      raise ValueError(f"config.distill.loss_chunk must be a positive number of positions, got "
                       f"{loss_chunk}")
    distill_loss.distill_cross_entropy(  # refuses a bad temperature or alpha now, in one line
        jnp.zeros((1, 1, 1)), jnp.zeros((1, 1, 1)), jnp.zeros((1, 1), jnp.int32),
        temperature=self.temperature, alpha=self.alpha)

  def flops_per_token(self, seq_len: int) -> float:
    return super().flops_per_token(seq_len) + flops.flops_per_token(
        self.teacher.model_cfg, seq_len, training=False)

  def frozen_abstract(self) -> Any:
    return {"teacher": state_lib.abstract_params(self.teacher.model_cfg)}

  def load_frozen(self, shardings: Any) -> Any:
    from maxgemma.checkpoint import Checkpointer, check_same_architecture  # noqa: PLC0415

    abstract = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                                       nn.unbox(self.frozen_abstract()["teacher"]))}
    step = self.teacher.step
    if step < 0:  # a preset teacher: its checkpoint is found and checked now
      if self._find_checkpoint is None:
        raise ValueError("a preset teacher (step -1) needs find_checkpoint to be loaded")
      found = self._find_checkpoint()
      check_same_architecture(found.model_cfg, self.teacher.model_cfg,
                              f"config.distill.teacher={self.teacher.workdir}",
                              "set config.distill.teacher_preset to the teacher's preset, or "
                              "empty to take the checkpoint's architecture")
      step = found.step
    ckpt = Checkpointer(self.teacher.workdir, read_only=True)
    try:
      restored = ckpt.restore(step, abstract, {"params": shardings["teacher"]})
    finally:
      ckpt.close()
    return {"teacher": restored["params"]}

  def _sums(self, params: Any, batch: Batch, frozen: Any, temperature: float, alpha: float,
            z_loss: float) -> LossSums:
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    hidden_BLD = Transformer(self.model_cfg).apply({"params": params}, *args, return_hidden=True)
    teacher_params = jax.lax.stop_gradient(frozen["teacher"])
    teacher_cfg = self.teacher.model_cfg
    teacher_BLE = Transformer(teacher_cfg).apply({"params": teacher_params}, *args,
                                                 return_hidden=True)
    return distill_loss.chunked_distill_cross_entropy(
        hidden_BLD, params["embedder"]["input_embedding"], teacher_BLE,
        teacher_params["embedder"]["input_embedding"], batch["targets"], batch["loss_weights"],
        chunk_size=self.loss_chunk, temperature=temperature, alpha=alpha, z_loss=z_loss,
        final_softcap=self.model_cfg.final_logit_softcap,
        teacher_softcap=teacher_cfg.final_logit_softcap, dtype=jnp.dtype(self.model_cfg.dtype),
        teacher_dtype=jnp.dtype(teacher_cfg.dtype), flatten=self.model_cfg.flatten_matmuls)

  def loss_sums(self, params: Any, batch: Batch, frozen: Any) -> LossSums:
    return self._sums(params, batch, frozen, self.temperature, self.alpha, self.z_loss)

  def metrics(self, sums: dict[str, jax.Array], denom: jax.Array) -> dict[str, jax.Array]:
    return {"loss": sums["objective_sum"] / denom, "distill_loss": sums["distill_sum"] / denom,
            "kl": sums["kl_sum"] / denom, "agreement": sums["agree"] / denom,
            "next_token_loss": sums["nll_sum"] / denom, "accuracy": sums["correct"] / denom,
            "z_loss": sums["z_loss_sum"] / denom}

  def eval_sums(self, params: Any, batch: Batch, frozen: Any) -> dict[str, jax.Array]:
    _, weight, sums = self._sums(params, batch, frozen, 1.0, 0.0, 0.0)
    return {"nll_sum": sums["nll_sum"], "weight": weight, "kl_sum": sums["kl_sum"],
            "agree": sums["agree"]}


class OfflineDistill(Objective):
  """Cross-entropy of the student against stored teacher top-k (`teacher_ids`, `teacher_weights`
  [B, L, K] in every batch), renormalised over the stored ids. Metrics as `OnlineDistill`'s, with
  `distill_loss`, `kl` and `agreement` against the stored target."""

  sums = distill_loss.AUX_KEYS

  def __init__(self, model_cfg: ModelConfig, k: int, *, alpha: float = 0.0, z_loss: float = 0.0,
               loss_chunk: int = 256):
    super().__init__(model_cfg)
    self.k, self.alpha, self.z_loss, self.loss_chunk = int(k), float(alpha), float(z_loss), \
        int(loss_chunk)
    if self.loss_chunk <= 0:
      raise ValueError(f"config.distill.loss_chunk must be a positive number of positions, got "
                       f"{loss_chunk}")
    if not 0 < self.k <= model_cfg.vocab_size:
      raise ValueError(f"config.data.teacher_topk: k={self.k} must be in [1, "
                       f"config.model.vocab_size={model_cfg.vocab_size}]")
    distill_loss.distill_cross_entropy(  # refuses a bad alpha now, in one line
        jnp.zeros((1, 1, 1)), jnp.zeros((1, 1, 1)), jnp.zeros((1, 1), jnp.int32), alpha=self.alpha)

  def batch_spec(self, global_batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (global_batch, seq_len, self.k)
    return {**token_batch_spec(global_batch, seq_len),
            "teacher_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
            "teacher_weights": jax.ShapeDtypeStruct(shape, jnp.float16)}

  def _sums(self, params: Any, batch: Batch, alpha: float, z_loss: float) -> LossSums:
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    hidden_BLD = Transformer(self.model_cfg).apply({"params": params}, *args, return_hidden=True)
    return distill_loss.chunked_topk_cross_entropy(
        hidden_BLD, params["embedder"]["input_embedding"], batch["teacher_ids"],
        batch["teacher_weights"], batch["targets"], batch["loss_weights"],
        chunk_size=self.loss_chunk, alpha=alpha, z_loss=z_loss,
        final_softcap=self.model_cfg.final_logit_softcap, dtype=jnp.dtype(self.model_cfg.dtype),
        flatten=self.model_cfg.flatten_matmuls)

  def loss_sums(self, params: Any, batch: Batch, frozen: Any) -> LossSums:
    return self._sums(params, batch, self.alpha, self.z_loss)

  metrics = OnlineDistill.metrics

  def eval_sums(self, params: Any, batch: Batch, frozen: Any) -> dict[str, jax.Array]:
    _, weight, sums = self._sums(params, batch, 0.0, 0.0)
    return {"nll_sum": sums["nll_sum"], "weight": weight, "kl_sum": sums["kl_sum"],
            "agree": sums["agree"]}


def offline_from_config(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig) -> OfflineDistill:
  """The offline objective of `cfg.data.teacher_topk`, checked against the student: one k and
  temperature, the teacher's vocabulary the student's."""
  from absl import logging  # noqa: PLC0415

  from maxgemma.data import topk  # noqa: PLC0415

  spec = str(cfg.data.teacher_topk)
  manifests = [topk.read_manifest(d.strip(), "config.data.teacher_topk")
               for d in spec.split(",") if d.strip()]
  ks = {int(m["k"]) for m in manifests}
  temps = {float(m["temperature"]) for m in manifests}
  vocabs = {int(m["teacher"]["vocab_size"]) for m in manifests}
  if len(ks) > 1 or len(temps) > 1:
    raise ValueError(f"config.data.teacher_topk={spec}: the directories hold different k "
                     f"({sorted(ks)}) or temperatures ({sorted(temps)}); use one teacher run's")
  if vocabs != {model_cfg.vocab_size}:
    raise ValueError(f"config.data.teacher_topk={spec}: written by a teacher of vocabulary "
                     f"{sorted(vocabs)}, the student's config.model.vocab_size is "
                     f"{model_cfg.vocab_size}; distillation needs one vocabulary")
  temperature = temps.pop()
  if float(cfg.distill.temperature) != temperature:
    raise ValueError(f"config.distill.temperature={cfg.distill.temperature}: the stored top-k of "
                     f"config.data.teacher_topk was drawn at temperature {temperature}; set "
                     f"config.distill.temperature={temperature} (or write the top-k again)")
  if cfg.distill.teacher:
    logging.warning("config.data.teacher_topk is set: offline distillation from the stored "
                    "top-k; config.distill.teacher=%s is not run", cfg.distill.teacher)
  return OfflineDistill(model_cfg, ks.pop(), alpha=float(cfg.distill.alpha),
                        z_loss=float(cfg.optim.z_loss), loss_chunk=int(cfg.distill.loss_chunk))


def from_config(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig
                ) -> OnlineDistill | OfflineDistill:
  """The distillation objective `cfg` describes (the teacher, or its stored top-k, checked)."""
  if offline(cfg):
    return offline_from_config(cfg, model_cfg)
  return OnlineDistill(model_cfg, teacher_config(cfg, model_cfg),
                       temperature=float(cfg.distill.temperature), alpha=float(cfg.distill.alpha),
                       z_loss=float(cfg.optim.z_loss), loss_chunk=int(cfg.distill.loss_chunk),
                       find_checkpoint=lambda: _checkpoint_teacher(cfg, model_cfg))
