"""Batched text generation from a checkpoint, with a KV cache.

  python -m maxgemma.sample --workdir=DIR --prompt="Once upon a time" [--prompt=...]
      [--max_new_tokens=64] [--temperature=0] [--top_k=0] [--top_p=1] [--chat] [--step=N]

Prompts of different lengths are left-padded (padding has position -1 and is never attended to).
Local layers keep ring buffers of `sliding_window` slots, global layers one slot per token.
Generation stops at `<end_of_turn>` or eos (per row); tokens/s of the decode loop are reported.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from maxgemma.model import kv_cache
from maxgemma.model.config import ModelConfig
from maxgemma.model.gemma import Transformer
from maxgemma.model.params import stack_layers, unstack_layers

Array = jax.Array
PAD_ID, EOS_ID, END_OF_TURN_ID = 0, 1, 107


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def validate(self) -> SamplingConfig:
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    return self


def filter_logits(logits_BV: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Logits with everything outside the top-k and the top-p nucleus set to -inf."""
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token when the mass before it is below top_p (the most likely one always stays).
    keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample_logits(logits_BV: Array, rng: Array, sampling: SamplingConfig) -> Array:
  """Next tokens [B] from float32 logits [B, V]."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]  # generated ids per row (up to and excluding the stop token)
  logits: np.ndarray | None  # [B, steps, V] float32 when asked for
  prefill_s: float
  decode_s: float
  decode_steps: int
  batch: int

  @property
  def tokens_per_s(self) -> float:
    """Decode throughput: tokens produced by all rows per second of the decode loop."""
    return self.batch * self.decode_steps / max(self.decode_s, 1e-9)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = PAD_ID
             ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P], positions [B, P]) with prompts right-aligned; padding has position -1."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  P = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  positions = np.full((len(prompts), P), -1, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, P - len(p):] = p
    positions[b, P - len(p):] = np.arange(len(p))
  return tokens, positions


def to_decode_params(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """Params and config for decoding: the unrolled tree (ring-buffer caches), no remat."""
  if "layers" in params:
    params = unstack_layers(params)  # numpy views, no copy
  return params, cfg.replace(scan_layers=False, remat_policy="none")


def generate(params: dict, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             stop_ids: Sequence[int] = (EOS_ID, END_OF_TURN_ID), seed: int = 0,
             ring: bool | None = None, return_logits: bool = False) -> Generation:
  """Generates up to `max_new_tokens` per prompt with a KV cache (one compiled step per token).

  `params` may be scanned or unrolled; `cfg.scan_layers` decides which model runs (scanned needs
  full-length caches for every layer, unrolled uses ring buffers for local layers by default).
  """
  sampling.validate()
  if "layers" in params and not cfg.scan_layers:
    params = unstack_layers(params)
  elif "layers" not in params and cfg.scan_layers:
    params = stack_layers(params)
  tokens_BP, positions_BP = left_pad(prompts)
  B, P = tokens_BP.shape
  max_len = P + max_new_tokens
  if max_len > cfg.max_seq_len:
    raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                     f"context max_seq_len={cfg.max_seq_len}; ask for fewer tokens")
  model = Transformer(cfg)
  params = jax.device_put(params)
  cache = kv_cache.init_cache(cfg, B, max_len, ring=ring)
  stop = jnp.asarray(list(stop_ids), jnp.int32)

  @functools.partial(jax.jit, donate_argnums=(2,))
  def step(params, logits_BV, cache, last_pos_B, done_B, rng):
    rng, key = jax.random.split(rng)
    next_B = sample_logits(logits_BV, key, sampling)
    done_B = done_B | jnp.isin(next_B, stop)
    pos_B = last_pos_B + 1
    logits_B1V, cache = model.apply({"params": params}, next_B[:, None], pos_B[:, None], cache,
                                    method=Transformer.decode)
    return next_B, logits_B1V[:, 0], cache, pos_B, done_B, rng

  prefill = jax.jit(lambda params, t, p, c: model.apply({"params": params}, t, p, c,
                                                        method=Transformer.decode),
                    donate_argnums=(3,))
  t0 = time.perf_counter()
  logits_BPV, cache = prefill(params, jnp.asarray(tokens_BP), jnp.asarray(positions_BP), cache)
  logits_BV = logits_BPV[:, -1]
  logits_BV.block_until_ready()
  prefill_s = time.perf_counter() - t0

  last_pos_B = jnp.asarray(positions_BP[:, -1])
  done_B = jnp.zeros((B,), bool)
  rng = jax.random.key(seed)
  # Compile the step before timing the loop, so tokens/s measures decoding only.
  step_c = step.lower(params, logits_BV, cache, last_pos_B, done_B, rng).compile()
  out, all_logits, steps = [], [], 0
  t0 = time.perf_counter()
  for _ in range(max_new_tokens):
    if return_logits:
      all_logits.append(np.asarray(logits_BV))
    next_B, logits_BV, cache, last_pos_B, new_done_B, rng = step_c(
        params, logits_BV, cache, last_pos_B, done_B, rng)
    out.append(np.where(np.asarray(done_B), -1, np.asarray(next_B)))
    steps += 1
    done_B = new_done_B
    if bool(jnp.all(done_B)):
      break
  decode_s = time.perf_counter() - t0
  stop_set = set(int(s) for s in stop_ids)
  rows = []
  for b in range(B):
    row = []
    for t in range(len(out)):
      tok = int(out[t][b])
      if tok < 0 or tok in stop_set:
        break
      row.append(tok)
    rows.append(row)
  logits = np.stack(all_logits, axis=1) if return_logits else None
  return Generation(rows, logits, prefill_s, decode_s, steps, B)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Experiment directory holding checkpoints/.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat for a batch.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_bool("chat", False, "Wrap each prompt in the Gemma chat template (user turn).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("tokenizer", "", "SentencePiece model (default: WORKDIR/tokenizer.model, "
                      "then the training config's tokenizer).")
  flags.DEFINE_string("dtype", "float32", "Compute dtype for sampling (float32 or bfloat16).")


def main(argv: Sequence[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  from maxgemma.checkpoint import load_params  # noqa: PLC0415
  from maxgemma.convert.workdir_tokenizer import resolve_tokenizer  # noqa: PLC0415
  from maxgemma.data.tokenizer import load_tokenizer  # noqa: PLC0415

  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  if not FLAGS.prompt:
    raise app.UsageError("pass at least one --prompt")
  params, cfg, step = load_params(FLAGS.workdir, FLAGS.step)
  tok = load_tokenizer(resolve_tokenizer(FLAGS.workdir, FLAGS.tokenizer))
  texts = list(FLAGS.prompt)
  if FLAGS.chat:
    texts = [tok.chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
             for t in texts]
  prompts = [tok.encode(t, add_bos=True) for t in texts]
  params, cfg = to_decode_params(params, cfg.replace(dtype=FLAGS.dtype))
  gen = generate(params, cfg, prompts, max_new_tokens=FLAGS.max_new_tokens,
                 sampling=SamplingConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p),
                 seed=FLAGS.seed)
  for text, row in zip(FLAGS.prompt, gen.tokens, strict=True):
    print(f"=== {text}\n{tok.decode(row)}")
  print(f"step {step}: {len(prompts)} prompts, prefill {gen.prefill_s:.2f}s, "
        f"{gen.decode_steps} decode steps in {gen.decode_s:.2f}s = "
        f"{gen.tokens_per_s:.1f} tokens/s ({os.cpu_count()} CPUs, {jax.devices()[0].platform})")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
