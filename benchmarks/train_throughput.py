"""Train-step throughput and MFU over a grid of model x sequence x mesh x attention x remat.

Each row builds the trainer's own state and jitted step (`maxgemma.trainer.build`: the code
`maxgemma.train` runs), compiles it ahead of time (compile time and XLA's memory analysis), runs
warm-up steps, then times `--steps` steps per repeat with one device sync at the end of each repeat
(no host syncs between steps; the state is donated). It prints a table and writes JSON (and, with
`--markdown`, the table into `docs/performance.md` between the BEGIN/END markers of the grid).

MFU = model FLOPs per step / (step time x devices x peak FLOP/s per device), where model FLOPs per
step = `maxgemma.model.flops.flops_per_token(cfg, L) x B x L`: 6 x matmul weights (the tied output
projection included) plus attention 12 x N x H x the mean attended context, counting only the causal
half and only the window on sliding-window layers. On a CPU the peak is a jitted float32
2048 x 2048 matmul measured in the same run (`metrics.measure_cpu_matmul_peak`, the best of the
measurements before and after the grid, so the MFU is not flattered by a slow peak sample), and the
fake host devices of a multi-device CPU mesh share the same cores, so `devices` counts the machine
once. On GPU/TPU the peak is the data-sheet bf16 figure (`hardware.PEAK_FLOPS`).

  .venv/bin/python benchmarks/train_throughput.py --grid cpu [--markdown]
  .venv/bin/python benchmarks/train_throughput.py --grid h100      # on one H100 (see docs)
  .venv/bin/python benchmarks/train_throughput.py --grid smoke --json_out /tmp/t.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

if "--host_devices" in sys.argv:  # must be set before jax is imported
  _n = sys.argv[sys.argv.index("--host_devices") + 1]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={_n}")

import jax
import numpy as np

from maxgemma import config as config_lib
from maxgemma import metrics, sharding
from maxgemma.model import flops as flops_lib
from maxgemma.trainer.build import build

RESULTS = os.path.join(os.path.dirname(__file__), "results", "train_throughput.json")
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "performance.md")

# Gemma-shaped models (GeGLU, RMSNorm, MQA/GQA, tied embedding, head_dim a multiple of 64) sized
# for a 2-core CPU; the Gemma 1 2B preset for one H100. Every field is a `config.model` override.
MODELS: dict[str, dict[str, Any]] = {
    "cpu-tiny": dict(preset="tiny_gemma1_mqa", dtype="float32",  # the smoke test's model
                     flatten_matmuls=True),
    "cpu-small": dict(preset="gemma1_2b", num_layers=4, d_model=512, ffn_dim=2048, num_heads=4,
                      num_kv_heads=1, head_dim=128, vocab_size=8192, max_seq_len=1024,
                      dtype="float32", flatten_matmuls=True),
    "cpu-mid": dict(preset="gemma2_2b", num_layers=4, d_model=768, ffn_dim=3072, num_heads=6,
                    num_kv_heads=2, head_dim=128, vocab_size=16384, max_seq_len=1024,
                    sliding_window=256, query_pre_attn_scalar=128, dtype="float32",
                    flatten_matmuls=True),
    "gemma-2b": dict(preset="gemma1_2b", dtype="bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class Row:
  """One benchmark configuration."""

  model: str
  seq_len: int
  batch: int
  mesh: str = "data1"  # "data2", "fsdp2", "data1": axis name + size (the rest is 1)
  attention: str = "xla"
  remat: str = "full"
  scan: bool = True
  loss_chunk: int = 0
  note: str = ""

  def label(self) -> str:
    return (f"{self.model} L{self.seq_len} B{self.batch} {self.mesh} {self.attention} "
            f"{self.remat} {'scan' if self.scan else 'unrolled'} chunk{self.loss_chunk}")


def _grid(name: str) -> list[Row]:
  if name == "smoke":
    return [Row("cpu-tiny", 64, 2, remat="none")]
  if name == "cpu":
    rows = []
    for model, seq, batch in (("cpu-small", 256, 4), ("cpu-mid", 512, 1)):
      rows += [Row(model, seq, batch, remat="full"),
               Row(model, seq, batch, remat="none"),
               Row(model, seq, batch, remat="save_dots"),
               Row(model, seq, batch, remat="save_names"),
               Row(model, seq, batch, remat="full", scan=False),
               Row(model, seq, batch, remat="full", loss_chunk=128),
               Row(model, seq, batch, remat="full", attention="dot_product")]
    rows += [Row("cpu-small", 1024, 1, remat="full"),
             Row("cpu-small", 256, 4, remat="full", mesh="data2")]
    return rows
  if name == "h100":
    return [Row("gemma-2b", 8192, b, attention=a, remat=r, loss_chunk=1024)
            for a in ("dot_product", "xla") for r in ("save_dots", "full") for b in (2,)]
  raise ValueError(f"unknown grid {name!r}; known: smoke, cpu, h100")


def make_config(row: Row, steps: int) -> Any:
  """The trainer's ConfigDict for one row."""
  cfg = config_lib.base_config()
  for key, value in MODELS[row.model].items():
    cfg.model[key] = value
  cfg.model.attention_impl = row.attention
  cfg.model.remat_policy = row.remat
  cfg.model.scan_layers = row.scan
  cfg.train.global_batch = row.batch
  cfg.train.seq_len = row.seq_len
  cfg.train.loss_chunk = row.loss_chunk
  cfg.train.steps = steps
  cfg.optim.warmup_steps = 0
  axis, size = row.mesh.rstrip("0123456789"), int(row.mesh[len(row.mesh.rstrip("0123456789")):])
  cfg.mesh.ici_data = 1
  cfg.mesh[f"ici_{axis}"] = size
  return cfg


def synthetic_batch(B: int, L: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens, two packed documents per row (segment ids and restarting positions)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (B, L + 1)).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  seg[:, L // 2:] = 2
  pos = np.concatenate([np.arange(L // 2), np.arange(L - L // 2)])[None].repeat(B, 0)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos.astype(np.int32),
          "segment_ids": seg, "loss_weights": np.ones((B, L), np.float32)}


def _peak_bytes(compiled) -> int:
  """XLA's peak for the step: the compiler's own figure on TPU/GPU; on the CPU backend (which
  reports only the arguments there) arguments + outputs - aliased (donated) + temporaries."""
  mem = compiled.memory_analysis()
  if mem is None:
    return 0
  total = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
              + mem.temp_size_in_bytes)
  peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
  return total if jax.default_backend() == "cpu" or not peak else peak


def run_row(row: Row, *, steps: int, repeats: int, warmup: int, peak_flops: float,
            devices: list | None = None) -> dict[str, Any]:
  """Compiles and times one row; returns its result dict."""
  cfg = make_config(row, steps * repeats + warmup)
  mesh = sharding.make_mesh(cfg.mesh, devices or jax.devices()[:_mesh_size(row.mesh)])
  setup = build(cfg, mesh)
  model_cfg = setup.model_cfg
  state = setup.create_state(seed=0)
  frozen = setup.load_frozen()
  batch = sharding.global_batch(synthetic_batch(row.batch, row.seq_len, model_cfg.vocab_size),
                                mesh)
  with setup.scope():
    t0 = time.perf_counter()
    compiled = setup.train_step.lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - t0
  peak_bytes = _peak_bytes(compiled)
  for _ in range(warmup):
    state, out = compiled(state, batch, frozen)
  jax.block_until_ready(state)
  loss0 = float(out["loss"]) if warmup else float("nan")
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, out = compiled(state, batch, frozen)
    jax.block_until_ready((state, out))
    times.append((time.perf_counter() - t0) / steps)
  tokens = row.batch * row.seq_len
  model_flops = flops_lib.flops_per_token(model_cfg, row.seq_len) * tokens
  step_s = min(times)
  platform_name = jax.devices()[0].platform
  # Fake CPU devices share the machine's cores: the measured peak is the whole machine's.
  n_dev = 1 if platform_name == "cpu" else len(mesh.devices.flat)
  if platform_name == "cpu":  # the peak measured right after the row, its best with the one before
    peak_flops = max(peak_flops, metrics.measure_cpu_matmul_peak())
  return {
      **dataclasses.asdict(row),
      "label": row.label(),
      "devices": len(mesh.devices.flat),
      "params": _count(state["params"]),
      "tokens_per_step": tokens,
      "model_flops_per_step": model_flops,
      "compile_s": round(compile_s, 2),
      "step_s": step_s,  # the best repeat: other work on the machine only ever slows a step
      "step_s_median": statistics.median(times),
      "step_s_all": times,
      "tokens_per_s": tokens / step_s,
      "peak_flops_per_device": peak_flops,
      "mfu": metrics.mfu(model_flops, step_s, n_dev, peak_flops),
      "mfu_median": metrics.mfu(model_flops, statistics.median(times), n_dev, peak_flops),
      "peak_memory_bytes": peak_bytes,
      "loss_after_warmup": loss0,
      "final_loss": float(out["loss"]),
  }


def _mesh_size(mesh: str) -> int:
  return int(mesh[len(mesh.rstrip("0123456789")):])


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def format_table(rows: list[dict[str, Any]]) -> str:
  """A markdown table of the results."""
  head = ("| model | seq | batch | mesh | attention | remat | layers | loss chunk | tokens/s "
          "| step ms | peak GFLOP/s | MFU | MFU vs run peak | compile s | peak MiB |")
  lines = [head, "|" + "---|" * 15]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['model']} | {r['seq_len']} | {r['batch']} | {r['mesh']} | "
                   f"{r['attention']} | {r['remat']} | {'scan' if r['scan'] else 'unrolled'} | "
                   f"{r['loss_chunk']} | error: {r['error'][:60]} | | | | | | |")
      continue
    lines.append(
        f"| {r['model']} | {r['seq_len']} | {r['batch']} | {r['mesh']} | {r['attention']} | "
        f"{r['remat']} | {'scan' if r['scan'] else 'unrolled'} | {r['loss_chunk']} | "
        f"{r['tokens_per_s']:.0f} | {r['step_s'] * 1e3:.1f} | "
        f"{r['peak_flops_per_device'] / 1e9:.1f} | {100 * r['mfu']:.1f}% | "
        f"{100 * r.get('mfu_vs_run_peak', r['mfu']):.1f}% | "
        f"{r['compile_s']:.1f} | {r['peak_memory_bytes'] / 2**20:.0f} |")
  return "\n".join(lines)


def write_markdown(path: str, grid: str, text: str) -> None:
  """Replaces the block between this grid's markers in `path` (appends it when missing)."""
  begin, end = f"<!-- BEGIN train_throughput {grid} -->", f"<!-- END train_throughput {grid} -->"
  doc = open(path).read() if os.path.exists(path) else "# Performance\n"
  block = f"{begin}\n{text}\n{end}"
  if begin in doc and end in doc:
    doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
  else:
    doc = doc.rstrip("\n") + "\n\n" + block + "\n"
  with open(path, "w") as f:
    f.write(doc)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--grid", default="cpu", help="smoke | cpu | h100")
  p.add_argument("--only", default="", help="comma-separated substrings: keep matching rows")
  p.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--host_devices", type=int, default=0, help="fake CPU devices (before jax)")
  p.add_argument("--json_out", default=RESULTS)
  p.add_argument("--markdown", action="store_true", help="write the table into docs")
  p.add_argument("--doc", default=DOC)
  args = p.parse_args(argv)

  rows = _grid(args.grid)
  if args.only:
    keys = args.only.split(",")
    rows = [r for r in rows if any(k in r.label() for k in keys)]
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  peaks = []
  results = []
  for row in rows:
    if _mesh_size(row.mesh) > len(jax.devices()):
      print(f"skip {row.label()}: needs {_mesh_size(row.mesh)} devices", flush=True)
      continue
    peak = metrics.measure_cpu_matmul_peak() if on_cpu else metrics.peak_flops_per_device(
        device=device)
    try:
      r = run_row(row, steps=args.steps, repeats=args.repeats, warmup=args.warmup,
                  peak_flops=peak)
    except Exception as e:  # a row that does not compile or fit: recorded, the grid goes on
      r = {**dataclasses.asdict(row), "label": row.label(), "error": f"{type(e).__name__}: {e}"}
    results.append(r)
    if on_cpu and "error" not in r:
      peaks.append(r["peak_flops_per_device"])
    if "error" in r:
      print(f"{row.label()}: {r['error'][:300]}", flush=True)
    else:
      print(f"{row.label()}: {r['tokens_per_s']:.0f} tok/s, step {r['step_s'] * 1e3:.1f} ms "
            f"(median {r['step_s_median'] * 1e3:.1f}), MFU {100 * r['mfu']:.1f}%, compile "
            f"{r['compile_s']:.1f} s, peak {r['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
  if on_cpu and peaks:
    # The conservative figure: against the best peak seen anywhere in this run.
    for r in results:
      if "error" not in r:
        r["mfu_vs_run_peak"] = metrics.mfu(r["model_flops_per_step"], r["step_s"], 1, max(peaks))
  peak = (max(peaks) if peaks else 0.0) if on_cpu else metrics.peak_flops_per_device(
      device=device)
  table = format_table(results)
  header = (f"device: {device.device_kind} ({device.platform}, {len(jax.devices())} device(s), "
            f"{os.cpu_count()} CPU cores); peak {peak / 1e9:.1f} GFLOP/s per device "
            + ("(the best f32 2048^3 matmul of the run; each row's MFU uses the peak measured "
               f"around it: {[round(x / 1e9, 1) for x in peaks]} GFLOP/s)"
               if on_cpu else "(data sheet, bf16 dense)")
            + f"; jax {jax.__version__}")
  print(header)
  print(table)
  report = {"grid": args.grid, "device": device.device_kind, "platform": device.platform,
            "num_devices": len(jax.devices()), "cpu_count": os.cpu_count(),
            "peak_flops_per_device": peak, "peak_samples": peaks, "jax_version": jax.__version__,
            "machine": platform.machine(), "steps": args.steps, "repeats": args.repeats,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "rows": results}
  if args.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
      json.dump(report, f, indent=2)
  if args.markdown:
    write_markdown(args.doc, args.grid, header + "\n\n" + table)
  return report


if __name__ == "__main__":
  main()
