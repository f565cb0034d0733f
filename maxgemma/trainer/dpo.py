"""Direct preference optimisation (DPO, Rafailov et al. 2023) as a trainer objective.

Shape letters: B batch (one preference pair per row), L length, V vocab, P pairs.

A preference batch is a packed token batch whose every row holds one pair: segment 1 is the
prompt followed by the chosen answer, segment 2 the same prompt followed by the rejected answer
(segment 0 is padding; `pack_pair`, from maxgemma/data/preference.py, builds one), so one forward
pass scores both sides. `loss_weights` are 1 on the answer targets only. Each side's score is the
sum of its answer tokens' log-probabilities.

With s = beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))) the
loss of a pair is `-(1 - eps) log sigmoid(s) - eps log sigmoid(-s)` (eps: label smoothing, the
conservative DPO of Mitchell 2023). The reference is a frozen input of every step (`{"reference":
params}`), sharded by the same rules table as the policy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from maxgemma.data.preference import CHOSEN, REJECTED, pack_pair  # noqa: F401 (re-exported)
from maxgemma.model import flops
from maxgemma.model.config import ModelConfig
from maxgemma.model.gemma import Transformer
from maxgemma.trainer import frozen
from maxgemma.trainer import state as state_lib
from maxgemma.trainer.objective import Batch, LossSums, Objective


def dpo_loss(policy_chosen_P: jax.Array, policy_rejected_P: jax.Array,
             ref_chosen_P: jax.Array, ref_rejected_P: jax.Array, *, beta: float,
             label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-pair DPO losses [P] (float32) and per-pair figures: `margin` (the reward margin s),
  `correct` (1 where the chosen reward is above the rejected one)."""
  if not beta > 0:
    raise ValueError(f"config.dpo.beta must be positive, got {beta}")
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"config.dpo.label_smoothing must be in [0, 0.5), got {label_smoothing}")
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  chosen_reward_P = beta * (f32(policy_chosen_P) - f32(ref_chosen_P))
  rejected_reward_P = beta * (f32(policy_rejected_P) - f32(ref_rejected_P))
  margin_P = chosen_reward_P - rejected_reward_P
  loss_P = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin_P)
            - label_smoothing * jax.nn.log_sigmoid(-margin_P))
  return loss_P, {"margin": margin_P,
                  "correct": (chosen_reward_P > rejected_reward_P).astype(jnp.float32)}


def side_logprobs(logits_BLV: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Summed answer-token log-probabilities of each row's chosen and rejected segments, [B] each."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  token_BL = jnp.take_along_axis(logp_BLV, batch["targets"][..., None], axis=-1)[..., 0]
  token_BL = token_BL * batch["loss_weights"].astype(jnp.float32)
  seg_BL = batch["segment_ids"]
  return (jnp.sum(jnp.where(seg_BL == CHOSEN, token_BL, 0.0), axis=-1),
          jnp.sum(jnp.where(seg_BL == REJECTED, token_BL, 0.0), axis=-1))


def pair_mask(batch: Batch) -> jax.Array:
  """1.0 for the rows that hold a pair (some answer weight on both sides), [B]."""
  w_BL = batch["loss_weights"].astype(jnp.float32)
  seg_BL = batch["segment_ids"]
  has = lambda side: jnp.sum(jnp.where(seg_BL == side, w_BL, 0.0), axis=-1) > 0  # noqa: E731
  return (has(CHOSEN) & has(REJECTED)).astype(jnp.float32)


class DPO(Objective):
  """DPO of the policy against a frozen reference, normalised by the number of pairs.

  Frozen inputs: `{"reference": params}` (by default the policy's own starting weights, given by
  `load_reference`). Metrics: `loss`, `reward_margin`, `preference_accuracy`, `chosen_logp`,
  `rejected_logp` (the policy's mean summed log-probabilities). Held-out batches give `nll_sum`
  (the DPO loss sum), `weight` (pairs) and `correct`.
  """

  sums = ("loss_sum", "margin_sum", "correct", "chosen_logp_sum", "rejected_logp_sum")

  def __init__(self, model_cfg: ModelConfig, *, beta: float = 0.1, label_smoothing: float = 0.0,
               load_reference=None, reference_cfg: ModelConfig | None = None):
    super().__init__(model_cfg)
    self.beta, self.label_smoothing = float(beta), float(label_smoothing)
    dpo_loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta=self.beta,
             label_smoothing=self.label_smoothing)  # refuses a bad beta or smoothing now
    self.reference_cfg = reference_cfg or model_cfg
    if self.reference_cfg.vocab_size != model_cfg.vocab_size:
      raise ValueError(f"the DPO reference's vocabulary ({self.reference_cfg.vocab_size}) differs "
                       f"from the policy's ({model_cfg.vocab_size}); DPO needs one tokenizer")
    self._load_reference = load_reference
    # The reference is the policy's starting weights (config.dpo.reference empty): a LoRA run
    # pins it to its base's step (`lora.LoRA.pin_base` sets `reference_step`).
    self.reference_is_start, self.reference_step = False, None

  def weight(self, batch: Batch) -> jax.Array:
    return jnp.maximum(jnp.sum(pair_mask(batch)), 1.0)

  def flops_per_token(self, seq_len: int) -> float:
    return super().flops_per_token(seq_len) + flops.flops_per_token(
        self.reference_cfg, seq_len, training=False)

  def frozen_abstract(self) -> Any:
    return {"reference": state_lib.abstract_params(self.reference_cfg)}

  def load_frozen(self, shardings: Any) -> Any:
    if self._load_reference is None:
      raise ValueError("the DPO objective has no reference model: pass load_reference "
                       "(a function of the reference shardings returning its parameters)")
    if self.reference_step is not None:
      return {"reference": self._load_reference(shardings["reference"], self.reference_step)}
    return {"reference": self._load_reference(shardings["reference"])}

  def _sums(self, params: Any, batch: Batch, frozen: Any) -> LossSums:
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    pc_B, pr_B = side_logprobs(Transformer(self.model_cfg).apply({"params": params}, *args), batch)
    ref_params = jax.lax.stop_gradient(frozen["reference"])
    rc_B, rr_B = side_logprobs(
        Transformer(self.reference_cfg).apply({"params": ref_params}, *args), batch)
    loss_B, figures = dpo_loss(pc_B, pr_B, rc_B, rr_B, beta=self.beta,
                               label_smoothing=self.label_smoothing)
    mask_B = pair_mask(batch)
    total = jnp.sum(loss_B * mask_B)
    return total, jnp.sum(mask_B), {
        "loss_sum": total, "margin_sum": jnp.sum(figures["margin"] * mask_B),
        "correct": jnp.sum(figures["correct"] * mask_B),
        "chosen_logp_sum": jnp.sum(pc_B * mask_B), "rejected_logp_sum": jnp.sum(pr_B * mask_B)}

  def loss_sums(self, params: Any, batch: Batch, frozen: Any) -> LossSums:
    return self._sums(params, batch, frozen)

  def metrics(self, sums: dict[str, jax.Array], denom: jax.Array) -> dict[str, jax.Array]:
    return {"loss": sums["loss_sum"] / denom, "reward_margin": sums["margin_sum"] / denom,
            "preference_accuracy": sums["correct"] / denom,
            "chosen_logp": sums["chosen_logp_sum"] / denom,
            "rejected_logp": sums["rejected_logp_sum"] / denom}

  def eval_sums(self, params: Any, batch: Batch, frozen: Any) -> dict[str, jax.Array]:
    _, weight, sums = self._sums(params, batch, frozen)
    return {"nll_sum": sums["loss_sum"], "weight": weight, "correct": sums["correct"]}


def params_loader(model_cfg: ModelConfig, workdir: str, seed: int):
  """A function of shardings (and a step: None = the latest) giving `workdir`'s checkpointed
  parameters, or ("" workdir) the parameters a fresh run with `seed` starts from."""
  def load(shardings: Any, step: int | None = None) -> Any:
    if not workdir:
      init = lambda: state_lib.init_params(model_cfg, jax.random.key(seed))  # noqa: E731
      return jax.jit(init, out_shardings=shardings)()
    import flax.linen as nn  # noqa: PLC0415

    from maxgemma.checkpoint import Checkpointer  # noqa: PLC0415
    ckpt = Checkpointer(workdir, read_only=True)
    try:
      step = ckpt.latest_step() if step is None else step
      if step is None:
        raise FileNotFoundError(f"{workdir}: no complete checkpoint to load parameters from; "
                                "train or import one there first")
      abstract = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                                         nn.unbox(state_lib.abstract_params(model_cfg)))}
      return ckpt.restore(step, abstract, {"params": shardings})["params"]
    finally:
      ckpt.close()
  return load


def enabled(cfg: Any) -> bool:
  """Whether `cfg` trains by DPO (`config.dpo.enabled`)."""
  return bool(cfg.get("dpo", {}).get("enabled", False))


def check_reference(cfg: Any, model_cfg: ModelConfig, workdir: str) -> None:
  """Refuses, in one line naming config.dpo.reference, a reference workdir without a complete
  checkpoint, of another architecture than the policy, or of another tokenizer."""
  from maxgemma.checkpoint import check_same_architecture, model_config_from_dict  # noqa: PLC0415

  key = f"config.dpo.reference={workdir}"
  _, meta = frozen.latest_checkpoint(workdir, key)
  if meta.get("model"):
    check_same_architecture(model_config_from_dict(meta["model"]), model_cfg, key,
                            "DPO's reference has the policy's architecture: point "
                            "config.dpo.reference at one, or leave it empty (the policy's start)")
  frozen.check_same_tokenizer(cfg, workdir, meta, key, frozen="reference", trained="policy")


def from_config(cfg: Any, model_cfg: ModelConfig) -> DPO:
  """The DPO objective `cfg.dpo` describes; the reference is `cfg.dpo.reference`'s latest
  checkpoint, or ("") the policy's starting weights."""
  if cfg.dpo.reference:
    check_reference(cfg, model_cfg, str(cfg.dpo.reference))
  objective = DPO(model_cfg, beta=float(cfg.dpo.beta),
                  label_smoothing=float(cfg.dpo.label_smoothing),
                  load_reference=params_loader(
                      model_cfg, str(cfg.dpo.reference or cfg.get("lora", {}).get("base", "")),
                      int(cfg.train.seed)))
  objective.reference_is_start = not cfg.dpo.reference
  return objective
