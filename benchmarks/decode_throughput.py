"""Greedy decoding tokens/s on one CPU device: maxgemma's sampler against transformers' `generate`.

  .venv/bin/python benchmarks/decode_throughput.py [--preset=gemma3_270m] [--batch=1]
      [--prompt_len=16] [--new_tokens=32] [--repeats=3] [--json_out=FILE]

One model of random float32 weights (norm scales included), three decoders on it, in this one
process and interleaved repeat by repeat, so that the ratios hold on a busy machine:

- `maxgemma`: `maxgemma.sample.generate` (prefill, then the whole decode in one compiled
  `lax.while_loop` with the KV cache donated and updated in place);
- `per-token step`: the same model and cache, one jitted step per token called from Python with a
  host sync on every token (the sampler's loop before the while_loop);
- `transformers`: the Hugging Face model built from the same weights by the project's own
  exporter (`maxgemma.convert.hf`), `generate(do_sample=False)`, its default attention.

Decode tokens/s leaves the prefill out: for maxgemma the sampler times its loop alone; for
transformers the time of `generate` for 1 new token is subtracted from the time for N. The best
repeat of each decoder is reported (other work on the machine only ever slows a run down). Every
decoder must produce the same greedy tokens, or the benchmark fails. Prints a table and writes
benchmarks/results/decode_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from maxgemma import sample  # noqa: E402
from maxgemma.convert import hf  # noqa: E402
from maxgemma.model import kv_cache  # noqa: E402
from maxgemma.model.gemma import Transformer  # noqa: E402
from maxgemma.model.presets import get_preset  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results", "decode_throughput.json")


def random_weights(cfg, seed: int = 0) -> dict:
  """Random float32 weights in the official (unrolled) tree."""
  shapes = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                                   jnp.zeros((1, 4), jnp.int32)))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    std = 0.3 if "norm" in name else (cfg.d_model ** -0.5 if "embedding" in name else 0.05)
    return rng.standard_normal(s.shape, np.float32) * np.float32(std)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def run_maxgemma(params, cfg, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
  gen = sample.generate(params, cfg, prompts, max_new_tokens=new_tokens, stop_ids=())
  return gen.tokens_per_s, gen.tokens


class PerTokenStep:
  """The model and cache of the sampler, one jitted step per token with a host sync each."""

  def __init__(self, params, cfg, prompts, new_tokens: int):
    self.cfg, self.new_tokens = cfg, new_tokens
    self.tokens_BP, self.positions_BP = sample.left_pad(prompts)
    self.params = jax.device_put(params)
    model = Transformer(cfg)
    decode = lambda p, t, pos, c: model.apply({"params": p}, t, pos, c, method=Transformer.decode)
    self.prefill = jax.jit(decode, donate_argnums=(3,))

    def step(p, logits_BV, cache, pos_B):
      next_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
      logits_B1V, cache = decode(p, next_B[:, None], pos_B[:, None] + 1, cache)
      return next_B, logits_B1V[:, 0], cache, pos_B + 1

    self.step = jax.jit(step, donate_argnums=(2,))

  def __call__(self) -> tuple[float, list[list[int]]]:
    B, P = self.tokens_BP.shape
    cache = kv_cache.init_cache(self.cfg, B, P + self.new_tokens)
    logits_BPV, cache = self.prefill(self.params, self.tokens_BP, self.positions_BP, cache)
    logits_BV, pos_B = logits_BPV[:, -1], jnp.asarray(self.positions_BP[:, -1])
    logits_BV.block_until_ready()
    out = []
    t0 = time.perf_counter()
    for _ in range(self.new_tokens):
      next_B, logits_BV, cache, pos_B = self.step(self.params, logits_BV, cache, pos_B)
      out.append(np.asarray(next_B))  # the host sync of every token
    dt = time.perf_counter() - t0
    return B * self.new_tokens / dt, np.stack(out, axis=1).tolist()


class Transformers:
  """transformers' `generate` on the same weights (decode time: N new tokens minus 1)."""

  def __init__(self, params, cfg, prompts, new_tokens: int):
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**hf.hf_config(cfg))
    self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {k: torch.from_numpy(np.asarray(v, np.float32))
             for k, v in hf.to_hf(params, cfg).items()}
    missing, unexpected = self.model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
      raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    self.model.tie_weights()
    self.torch, self.new_tokens = torch, new_tokens
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
      raise ValueError("the transformers row needs prompts of one length (no padding)")
    self.ids = torch.tensor(prompts)
    self.attn = self.model.config._attn_implementation

  def _generate(self, n: int):
    with self.torch.no_grad():
      return self.model.generate(self.ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 attention_mask=self.torch.ones_like(self.ids))

  def __call__(self) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    self._generate(1)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = self._generate(self.new_tokens)
    full = time.perf_counter() - t0
    B = self.ids.shape[0]
    tokens = out[:, self.ids.shape[1]:].tolist()
    return B * (self.new_tokens - 1) / max(full - one, 1e-9), tokens


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--preset", default="gemma3_270m")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json_out", default=RESULTS)
  a = p.parse_args(argv)

  cfg = get_preset(a.preset, dtype="float32", param_dtype="float32", scan_layers=False,
                   remat_policy="none")
  params = random_weights(cfg, a.seed)
  rng = np.random.default_rng(a.seed + 1)
  prompts = rng.integers(3, cfg.vocab_size, (a.batch, a.prompt_len)).tolist()
  decoders = {
      "maxgemma": lambda: run_maxgemma(params, cfg, prompts, a.new_tokens),
      "per-token step": PerTokenStep(params, cfg, prompts, a.new_tokens),
      "transformers": Transformers(params, cfg, prompts, a.new_tokens),
  }
  best: dict[str, float] = {}
  runs: dict[str, list[float]] = {name: [] for name in decoders}
  tokens: dict[str, list[list[int]]] = {}
  for name, fn in decoders.items():  # warm-up: compile, first-call allocations
    _, tokens[name] = fn()
  for _ in range(a.repeats):
    for name, fn in decoders.items():
      tps, out = fn()
      runs[name].append(tps)
      if out != tokens[name]:
        raise RuntimeError(f"{name}: greedy tokens changed between repeats")
  for name in decoders:
    best[name] = max(runs[name])
  agree = all(t == tokens["maxgemma"] for t in tokens.values())
  if not agree:
    raise RuntimeError(f"the decoders' greedy tokens differ: {tokens}")

  ref = best["transformers"]
  print(f"\n{cfg.family} {a.preset}: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.0f}M "
        f"float32 parameters, batch {a.batch}, prompt {a.prompt_len}, {a.new_tokens} new tokens, "
        f"best of {a.repeats}, 1 CPU device ({os.cpu_count()} cores)")
  print(f"{'decoder':16s} {'tokens/s':>9s} {'vs transformers':>16s}   repeats (tokens/s)")
  rows = []
  for name in decoders:
    rows.append({"decoder": name, "tokens_per_s": best[name], "ratio_vs_transformers":
                 best[name] / ref, "repeats_tokens_per_s": runs[name]})
    print(f"{name:16s} {best[name]:9.2f} {best[name] / ref:15.2f}x   "
          f"{', '.join(f'{r:.2f}' for r in runs[name])}")
  print(f"(identical greedy tokens: {agree}; transformers attention: "
        f"{decoders['transformers'].attn}; load average {os.getloadavg()[0]:.1f})")
  report = {"preset": a.preset, "dtype": "float32", "batch": a.batch,
            "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "repeats": a.repeats,
            "rows": rows, "identical_tokens": agree,
            "transformers_attention": decoders["transformers"].attn,
            "jax": jax.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
            "load_average": os.getloadavg()[0]}
  if a.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(a.json_out)), exist_ok=True)
    with open(a.json_out, "w") as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == "__main__":
  main()
