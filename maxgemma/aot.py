"""Ahead-of-time compile of the real train step for a TPU topology, on a machine without a TPU.

  python -m maxgemma.aot --config=configs/gemma_7b_v5e_1pod.py [--config.key=value ...] \
      [--topology=v5e:16x16] [--num_slices=N] [--target_mfu=0.5] [--json_out=FILE]

libtpu (`jax[tpu]`) describes the devices of `num_slices` slices of `topology`; the mesh of
`config.mesh` is laid over them, the state is abstract (sharded `jax.ShapeDtypeStruct`s, nothing is
allocated) and the trainer's own jitted step (`trainer.build`: explicit shardings, donated state)
is lowered and compiled by the TPU compiler. The report gives per-chip memory from
`memory_analysis()`, the model FLOPs per step from `maxgemma.model.flops` (XLA's `cost_analysis()`
counts a scanned layer body once, so its number is shown only for reference) and the roofline step
time at the chip's peak.
Exits non-zero with one line when the step does not fit in HBM. The chip figures come from
`maxgemma.hardware`; the cross-slice transfers are read from the compiled HLO by `maxgemma.hlo`.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from maxgemma import config as config_lib
from maxgemma import feed, hardware, hlo, sharding
from maxgemma.hardware import GiB
from maxgemma.trainer.build import build


class DoesNotFitError(RuntimeError):
  """The train step does not fit the chip's HBM (compiler refusal or peak over the limit)."""


def topology_devices(topology: str, num_slices: int = 1) -> list[Any]:
  """The devices of `num_slices` slices of `topology` (e.g. `v5e:16x16`), described by libtpu."""
  from jax.experimental import topologies

  chip = hardware.chip_for_topology(topology)
  # Several processes may load libtpu at once (otherwise they fight over its lock file).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Without these libtpu warns that it cannot find the TPU type and worker hostnames of this
  # (TPU-less) host; the topology comes from `topology`, not from them. Restored afterwards.
  quiet = {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost"}
  saved = {k: os.environ.get(k) for k in quiet}
  if all(v is None for v in saved.values()):
    os.environ.update(quiet)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chip_config_name=chip.chip_config_name,
                                        chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
  except Exception as e:  # libtpu missing or a bad name: one clear line
    raise ValueError(f"cannot describe TPU topology {topology!r} x {num_slices} slice(s) "
                     f"(is jax[tpu] installed?): {str(e).splitlines()[0]}") from e
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
  return list(desc.devices)


def slices_of(mesh_cfg: ml_collections.ConfigDict) -> int:
  """How many slices `mesh.dcn_*` asks for (1 when one of them is -1)."""
  dcn = [int(mesh_cfg.get(f"dcn_{a}", 1)) for a in sharding.MESH_AXES]
  return 1 if -1 in dcn else max(1, math.prod(dcn))


def topology_mesh(mesh_cfg: ml_collections.ConfigDict, topology: str, num_slices: int) -> Mesh:
  """The mesh of `mesh_cfg` laid over the devices of `num_slices` x `topology`, as on the pods."""
  return sharding.make_mesh(mesh_cfg, topology_devices(topology, num_slices))


def compile_train_step(cfg: ml_collections.ConfigDict, topology: str = "v5e:16x16",
                       num_slices: int | None = None, *, target_mfu: float = 0.5,
                       keep_compiled: bool = False) -> dict[str, Any]:
  """Compiles the trainer's step for `num_slices` x `topology`; returns the report dict.

  `num_slices` None: the product of `config.mesh.dcn_*`. Raises `DoesNotFitError` when the compiler
  refuses for lack of HBM or the peak exceeds the chip's usable HBM; other errors propagate.
  With `keep_compiled` the report also holds the executable ("compiled") and the abstract sharded
  state ("state").
  """
  config_lib.check_keys(cfg)
  chip = hardware.chip_for_topology(topology)
  if num_slices is None:
    num_slices = slices_of(cfg.mesh)
  mesh = topology_mesh(cfg.mesh, topology, num_slices)
  # The data feed on the topology's real device-to-host map: refused here, before compiling,
  # when the layout cannot be fed.
  feed_plan = feed.for_config(cfg, mesh)
  setup = build(cfg, mesh)
  model_cfg = setup.model_cfg
  B, L = int(cfg.train.global_batch), int(cfg.train.seq_len)
  state, batch, frozen = setup.abstract_args(B, L)
  what = (f"{cfg.model.preset} batch {B} x seq {L} on {num_slices} x {topology} "
          f"(mesh {dict(mesh.shape)})")
  t0 = time.perf_counter()
  with setup.scope():
    lowered = setup.train_step.lower(state, batch, frozen)
  t1 = time.perf_counter()
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)  # a report is always a fresh compile
  try:
    compiled = lowered.compile()
  except Exception as e:  # XlaRuntimeError; the TPU compiler's HBM refusal is RESOURCE_EXHAUSTED
    message = str(e)
    if "RESOURCE_EXHAUSTED" in message or "exceeds available HBM" in message \
        or "Ran out of memory" in message:
      first = next((ln.strip() for ln in message.splitlines() if "HBM" in ln or "memory" in ln),
                   message.splitlines()[0])
      err = DoesNotFitError(f"{what} does not fit: the TPU compiler refused: {first[:300]}")
      err.details = message  # the compiler's full report (largest allocations)
      raise err from e
    raise
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  lower_s, compile_s = t1 - t0, time.perf_counter() - t1

  mem = compiled.memory_analysis()
  peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
  memory = {
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "generated_code_bytes": int(mem.generated_code_size_in_bytes),
      "peak_bytes": peak,
      "usable_hbm_bytes": chip.usable_hbm_bytes,
      # Host memory of the program (offloaded activations, an offloaded optimizer state).
      "host_argument_bytes": int(getattr(mem, "host_argument_size_in_bytes", 0) or 0),
      "host_temp_bytes": int(getattr(mem, "host_temp_size_in_bytes", 0) or 0),
  }
  chips = mesh.devices.size
  tokens = B * L
  model_flops = setup.objective.flops_per_token(L) * tokens
  roofline_s = model_flops / (chips * chip.peak_flops)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo_text = compiled.as_text()
  sends = hlo.dcn_allreduce_sends(hlo_text)
  collectives = hlo.ici_collectives(hlo_text)
  ici_bytes = sum(c["sent_bytes"] for c in collectives)
  # Per kind and group size ("all-gather x16"): which collectives, over how many chips.
  ici_by_kind: dict[str, int] = {}
  for c in sorted(collectives, key=lambda c: (c["kind"], c["group"])):
    key = f"{c['kind']} x{c['group']}"
    ici_by_kind[key] = ici_by_kind.get(key, 0) + c["sent_bytes"]
  dcn_bytes = hlo.sends_bytes(sends)
  bounds = {"compute": roofline_s,
            "ici": ici_bytes / chip.ici_bytes_per_s if chip.ici_bytes_per_s else 0.0,
            "dcn": dcn_bytes / chip.dcn_bytes_per_s if chip.dcn_bytes_per_s else 0.0}
  report = {
      "preset": cfg.model.preset,
      "topology": topology,
      "num_slices": num_slices,
      "chips": chips,
      "chip": chip.name,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "global_batch": B,
      "seq_len": L,
      "tokens_per_step": tokens,
      "remat_policy": model_cfg.remat_policy,
      "loss_chunk": int(cfg.train.get("loss_chunk", 0)),
      "grad_accum_steps": int(cfg.optim.grad_accum_steps),
      "lower_s": round(lower_s, 1),  # tracing the step (CPU-side Python)
      "compile_s": round(compile_s, 1),  # the TPU compiler
      "memory": memory,
      "peak_gib": round(peak / GiB, 2),
      "usable_hbm_gib": round(chip.usable_hbm_bytes / GiB, 2),
      "fits": peak <= chip.usable_hbm_bytes,
      "model_flops_per_step": model_flops,
      "model_flops_per_chip": model_flops / chips,
      # XLA's count of one chip's program: a scanned layer body is counted once, not per layer.
      "xla_flops_per_chip_scan_body_once": float((cost or {}).get("flops", 0.0)),
      "peak_flops_per_chip": chip.peak_flops,
      "roofline_step_s": roofline_s,
      "target_mfu": target_mfu,
      "step_s_at_target_mfu": roofline_s / target_mfu,
      "tokens_per_s_per_chip_at_target_mfu": tokens / (roofline_s / target_mfu) / chips,
      "feed": {"hosts": len(feed_plan.rows),
               "rows_per_host": sorted({len(r) for r in feed_plan.rows.values()}),
               "hosts_per_row": sorted(set(feed_plan.hosts_per_row().values())),
               "loader_shards": feed_plan.loader_shards,
               "summary": feed_plan.describe(max_hosts=4)},
      "dcn_allreduce_sends": len(sends),
      "dcn_allreduce_bytes_per_chip": dcn_bytes,
      # Collective traffic inside the slice, and the step-time bounds it gives at the chip's
      # published bandwidths: `overlapped` (the slowest of compute, ICI and DCN) and `serial`
      # (their sum).
      "ici_bytes_per_chip": ici_bytes,
      "ici_bytes_by_kind": ici_by_kind,
      "step_bounds_s": {**bounds, "overlapped": max(bounds.values()),
                        "serial": sum(bounds.values())},
      "tokens_per_s_per_chip_bound": tokens / max(bounds.values()) / chips,
      # Each transfer: what one chip sends and the instruction that produced it.
      "dcn_transfers": [
          {"send": f"{s['dtype']}{list(s['shape'])}", "per_step": s["per_step"],
           "source": (f"{s['source'].opcode} {s['source'].array[0]}{list(s['source'].array[1])}"
                      if s["source"] is not None else ""),
           "from_reduce_scatter": hlo.is_reduce_scatter(s["source"])} for s in sends],
  }
  check_fits(report)
  if keep_compiled:
    report["compiled"], report["state"] = compiled, state
  return report


def check_fits(report: dict[str, Any]) -> None:
  """Raises DoesNotFitError when the compiled peak exceeds the chip's usable HBM."""
  peak, usable = report["memory"]["peak_bytes"], report["memory"]["usable_hbm_bytes"]
  if peak > usable:
    raise DoesNotFitError(
        f"{report['preset']} batch {report['global_batch']} x seq {report['seq_len']} on "
        f"{report['num_slices']} x {report['topology']} does not fit: peak {peak / GiB:.2f} GiB "
        f"per chip exceeds the {usable / GiB:.2f} GiB usable HBM of a {report['chip']} chip")


def format_report(r: dict[str, Any]) -> str:
  """The human-readable report."""
  m = r["memory"]
  g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
  lines = [
      f"{r['preset']} on {r['num_slices']} x {r['topology']} ({r['chips']} {r['chip']} chips), "
      f"mesh {r['mesh']}",
      f"  batch {r['global_batch']} x seq {r['seq_len']} = {r['tokens_per_step']:,} tokens/step, "
      f"remat {r['remat_policy']}, loss_chunk {r['loss_chunk']}, "
      f"grad_accum {r['grad_accum_steps']}; traced in {r['lower_s']:.1f} s, compiled in "
      f"{r['compile_s']:.1f} s",
      f"  memory per chip: arguments {g(m['argument_bytes'])}, outputs {g(m['output_bytes'])} "
      f"(aliased {g(m['alias_bytes'])}), temporaries {g(m['temp_bytes'])}",
      f"  peak {g(m['peak_bytes'])} of {g(m['usable_hbm_bytes'])} usable HBM "
      f"({100 * m['peak_bytes'] / m['usable_hbm_bytes']:.0f}%)"
      + (f"; host memory: arguments {g(m['host_argument_bytes'])}, temporaries "
         f"{g(m['host_temp_bytes'])}" if m.get("host_argument_bytes") or m.get("host_temp_bytes")
         else ""),
      f"  model FLOPs/step {r['model_flops_per_step']:.3e} "
      f"({r['model_flops_per_chip']:.3e} per chip; XLA cost_analysis, scanned body counted "
      f"once: {r['xla_flops_per_chip_scan_body_once']:.3e})",
      f"  roofline step time at {r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s/chip: "
      f"{r['roofline_step_s']:.2f} s; at {100 * r['target_mfu']:.0f}% MFU: "
      f"{r['step_s_at_target_mfu']:.2f} s ({r['tokens_per_s_per_chip_at_target_mfu']:,.0f} "
      f"tokens/s/chip)",
  ]
  if "feed" in r:
    lines += ["  " + line for line in r["feed"]["summary"].splitlines()]
  if r["num_slices"] > 1:
    lines.append(f"  cross-slice (DCN) reduction: {r['dcn_allreduce_sends']} transfers, "
                 f"{r['dcn_allreduce_bytes_per_chip'] / 2**20:.1f} MiB sent per chip per step")
  b = r["step_bounds_s"]
  lines.append(f"  collectives inside the slice (ICI): {r['ici_bytes_per_chip'] / 2**30:.2f} GiB "
               f"sent per chip per step; step bounds: compute {b['compute']:.2f} s, ICI "
               f"{b['ici']:.2f} s, DCN {b['dcn']:.2f} s -> {b['overlapped']:.2f} s overlapped, "
               f"{b['serial']:.2f} s serial")
  if r.get("ici_bytes_by_kind"):
    lines.append("    by kind and group size: " + ", ".join(
        f"{k} {v / 2**30:.2f} GiB" for k, v in r["ici_bytes_by_kind"].items()))
  return "\n".join(lines)


def _main(argv: list[str]) -> None:
  import json
  import sys

  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  # Compile only: local devices stay CPU (libtpu is used through the topology description).
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")
  try:
    report = compile_train_step(f.config, f.topology, f.num_slices, target_mfu=f.target_mfu,
                                keep_compiled=bool(f.hlo_out))
  except (DoesNotFitError, ValueError) as e:
    if f.oom_details and getattr(e, "details", None):
      print(e.details, file=sys.stderr)
    sys.exit(f"maxgemma.aot: {e}")
  compiled = report.pop("compiled", None)
  report.pop("state", None)
  if f.hlo_out:
    with open(f.hlo_out, "w") as fh:
      fh.write(compiled.as_text())
  print(format_report(report))
  if f.json_out:
    with open(f.json_out, "w") as fh:
      json.dump(report, fh, indent=2)


def main() -> None:
  """Command-line entry point."""
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("topology", "v5e:16x16", "TPU topology of one slice, e.g. v5e:16x16.")
  flags.DEFINE_integer("num_slices", None, "Slices (pods); default: product of mesh.dcn_*.")
  flags.DEFINE_float("target_mfu", 0.5, "MFU assumed for the estimated step time.")
  flags.DEFINE_string("json_out", None, "Also write the report as JSON here.")
  flags.DEFINE_string("hlo_out", None, "Also write the compiled TPU program's HLO text here.")
  flags.DEFINE_bool("oom_details", False, "When the compiler refuses, print its full report.")
  flags.mark_flags_as_required(["config"])
  app.run(_main)


if __name__ == "__main__":
  main()
