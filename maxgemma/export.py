"""Export a maxgemma checkpoint to Hugging Face, GGUF, the official Gemma format or PEFT.

  python -m maxgemma.export --workdir=DIR [--step=N] --format=hf|gguf|gemma|peft --out=PATH
      [--dtype=float32|bfloat16|float16|q8_0] [--tokenizer=FILE] [--overwrite]
      [--base_model=NAME]

  hf     a directory: safetensors shards, config.json, tokenizer.model + tokenizer configs
         (`transformers.AutoModelForCausalLM.from_pretrained(PATH)` loads it)
  gguf   one file (llama.cpp): architecture gemma/gemma2/gemma3, tokenizer in the metadata;
         --dtype float32 (default), float16, bfloat16 or q8_0
  gemma  an orbax checkpoint in the released layout (`gm.ckpts.load_params(PATH)` loads it)
  peft   (a LoRA run only) a directory: adapter_model.safetensors + adapter_config.json
         (`peft.PeftModel.from_pretrained(base, PATH)` loads it onto the base's hf export);
         --base_model is its base_model_name_or_path (default: the run's config.lora.base)

A LoRA run's workdir exported as hf, gguf or gemma gives the merged model: its base (the
checkpoint of `config.lora.base` the run trained on, as its meta records it, or the fresh init of
train.seed) with the adapters merged in by `maxgemma.lora.merge`, one layer at a time
(`maxgemma.convert.peft_format.MergedReader`).

The checkpoint is read one layer slice at a time (tensorstore) and written tensor by tensor, so
the process holds at most one layer besides what the format itself needs (the `gemma` format is
one orbax save: it holds one copy of the weights). Output goes to a temporary name and is renamed
when complete. With several processes (multi-host), process 0 writes and the others wait.

The tokenizer is `--tokenizer`, else the workdir's (`maxgemma.convert.workdir_tokenizer`); a
workdir that has none exports weights and config only, and the command says so in one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging

from maxgemma import optional_packages
from maxgemma.convert import gemma_checkpoint, hf, peft_format
from maxgemma.convert.atomic_output import atomic_output
from maxgemma.convert.checkpoint_reader import CheckpointReader
from maxgemma.convert.safetensors_io import ShardedWriter
from maxgemma.data.tokenizer import load
from maxgemma.model.config import ModelConfig

FORMATS = ("hf", "gguf", "gemma", "peft")
DTYPES = {"hf": ("float32", "bfloat16", "float16"), "gemma": ("float32", "bfloat16", "float16"),
          "peft": ("float32", "bfloat16", "float16"),
          "gguf": ("float32", "float16", "bfloat16", "q8_0")}  # gguf_format.OUT_TYPES


Reader = CheckpointReader | peft_format.MergedReader  # a LoRA run reads as its merged model


@dataclasses.dataclass(frozen=True)
class Exported:
  """What `export` wrote: the output path and the tokenizer's origin (None: no tokenizer)."""

  path: str
  tokenizer_origin: str | None
  note: str  # "" or the one line saying that no tokenizer was written and how to add one


def export(workdir: str, fmt: str, out: str, *, step: int | None = None, dtype: str = "float32",
           tokenizer: str = "", overwrite: bool = False, max_shard_mb: float = 2048,
           base_model: str = "") -> Exported | None:
  """Writes the export (None on processes other than 0).

  The tokenizer is the workdir's (`maxgemma.convert.workdir_tokenizer`); a workdir without one
  gets weights and config only, and `Exported.note` says so. A LoRA run's workdir gives the
  merged model (hf, gguf, gemma) or its adapters (peft, `base_model` naming their base).
  """
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}; allowed: {', '.join(FORMATS)}")
  if dtype not in DTYPES[fmt]:
    raise ValueError(f"--dtype={dtype!r} for --format={fmt}; allowed: {', '.join(DTYPES[fmt])}")
  if fmt == "gguf":
    optional_packages.require("gguf")
  if jax.process_count() > 1 and jax.process_index() != 0:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("maxgemma.export")
    return None
  reader = CheckpointReader(workdir, step)
  run = peft_format.lora_run(reader)
  if fmt == "peft":
    if run is None:
      raise peft_format.not_lora_error(workdir)
    peft_format.write_peft(run, out, gemma_checkpoint.np_dtype(dtype), overwrite=overwrite,
                           base_model=base_model)
    note = "" if base_model or run.base else (
        "the adapters' base is the fresh init of train.seed (config.lora.base is empty), which "
        "no hf export holds; export the merged model with --format=hf instead")
    _barrier()
    return Exported(out, None, note)
  if run is not None:
    reader = peft_format.MergedReader(run)
  found = reader.tokenizer(tokenizer)
  proto, note = None, ""
  if found.path is None:
    note = (f"no tokenizer written: {found.origin}; to add one, rerun with "
            "--tokenizer=FILE --overwrite (the model's SentencePiece tokenizer.model)")
  else:
    tok = load(found.path)
    if tok.vocab_size > reader.config.vocab_size:
      raise ValueError(f"tokenizer {tok.path} ({found.origin}) has {tok.vocab_size} pieces, more "
                       f"than the model's {reader.config.vocab_size} embedding rows; pass the "
                       "model's --tokenizer")
    proto = tok.model_proto
  {"hf": _export_hf, "gguf": _export_gguf, "gemma": _export_gemma}[fmt](
      reader, out, dtype, proto, overwrite, max_shard_mb)
  _barrier()
  return Exported(out, found.origin if proto is not None else None, note)


def _barrier() -> None:
  """Process 0 is done: release the others (waiting at the same barrier in `export`)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("maxgemma.export")


def _export_hf(reader: Reader, out: str, dtype: str, proto: bytes | None, overwrite: bool,
               max_shard_mb: float) -> None:
  cfg = reader.config
  np_dtype = gemma_checkpoint.np_dtype(dtype)
  with atomic_output(out, directory=True, overwrite=overwrite) as tmp:
    writer = ShardedWriter(tmp, {n: (s, np_dtype) for n, s in hf.hf_shapes(cfg).items()},
                           max_shard_bytes=int(max_shard_mb * 2**20))
    g = reader.embedder_and_final_norm()
    writer.write(hf.EMBED, g["embedder"]["input_embedding"])
    writer.write(hf.FINAL_NORM, g["final_norm"]["scale"])
    del g
    for i in range(cfg.num_layers):
      for name, array in hf.layer_to_hf(reader.block(i), cfg, i).items():
        writer.write(name, array)
    writer.close()
    config = {**hf.hf_config(cfg), "torch_dtype": dtype, "dtype": dtype}
    _write_json(os.path.join(tmp, "config.json"), config)
    if proto is not None:
      write_hf_tokenizer(tmp, proto, cfg)


def write_hf_tokenizer(directory: str, proto: bytes, cfg: ModelConfig) -> None:
  """tokenizer.model plus the configs `AutoTokenizer` needs to build a GemmaTokenizer."""
  with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
    f.write(proto)
  special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
             "unk_token": "<unk>"}
  _write_json(os.path.join(directory, "special_tokens_map.json"), special)
  _write_json(os.path.join(directory, "tokenizer_config.json"), {
      "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
      "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False,
      "spaces_between_special_tokens": False, **special})


def _export_gguf(reader: Reader, out: str, dtype: str, proto: bytes | None,
                 overwrite: bool, max_shard_mb: float) -> None:
  del max_shard_mb
  import gguf  # noqa: PLC0415

  from maxgemma.convert import gguf_format  # noqa: PLC0415

  cfg = reader.config
  out_type = gguf_format.OUT_TYPES[dtype]
  shapes = hf.hf_shapes(cfg)
  names = {n: gguf_format.gguf_name(n, cfg.family) for n in shapes}
  types = {n: gguf_format.storage_type(s, out_type) for n, s in shapes.items()}
  with atomic_output(out, directory=False, overwrite=overwrite) as tmp:
    w = gguf.GGUFWriter(tmp, gguf_format.ARCH[cfg.family])
    gguf_format.add_metadata(w, cfg, out_type, name=f"maxgemma step {reader.step}")
    if proto is not None:
      gguf_format.add_tokenizer(w, proto, cfg.vocab_size)
    # Exact norm scales go into the metadata, which precedes the tensors: read them first.
    hf_norm = {ours: theirs for ours, theirs in hf.NORM_NAMES[cfg.family].items()}
    for path in reader.block_paths():
      if path[-1] != "scale":
        continue
      for i in range(cfg.num_layers):
        hf_name = _hf_norm_name(path, hf_norm, i)
        w.add_array(gguf_format.EXACT_KEY + names[hf_name], reader.leaf(i, path).tolist())
    final = reader.arrays.read(("final_norm", "scale"))
    w.add_array(gguf_format.EXACT_KEY + names[hf.FINAL_NORM], final.tolist())
    for n, s in shapes.items():
      w.add_tensor_info(names[n], s, np.float32, gguf_format.nbytes(s, types[n]),
                        raw_dtype=types[n])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    def put(hf_name: str, array: np.ndarray) -> None:
      a = np.asarray(array, np.float32)
      if gguf_format.is_norm(hf_name):
        a = np.float32(1) + a
      w.write_tensor_data(gguf_format.encode(a, types[hf_name]))

    put(hf.EMBED, reader.arrays.read(("embedder", "input_embedding")))
    for i in range(cfg.num_layers):
      tensors = hf.layer_to_hf(reader.block(i), cfg, i)
      for name in shapes:  # the planned order
        if name in tensors:
          put(name, tensors[name])
    put(hf.FINAL_NORM, final)
    w.close()


def _hf_norm_name(path: tuple[str, ...], hf_norm: dict[str, str], i: int) -> str:
  pre = f"model.layers.{i}."
  if path == ("attn", "_query_norm", "scale"):
    return pre + "self_attn.q_norm.weight"
  if path == ("attn", "_key_norm", "scale"):
    return pre + "self_attn.k_norm.weight"
  return pre + hf_norm[path[0]] + ".weight"


def _export_gemma(reader: Reader, out: str, dtype: str, proto: bytes | None,
                  overwrite: bool, max_shard_mb: float) -> None:
  del max_shard_mb
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from maxgemma.checkpoint import model_config_to_dict  # noqa: PLC0415

  cfg = reader.config
  np_dtype = gemma_checkpoint.np_dtype(dtype)
  tree: dict[str, dict[str, np.ndarray]] = {}

  def put(path: tuple[str, ...], array: np.ndarray) -> None:
    key, leaf = gemma_checkpoint.to_flat(path)
    tree.setdefault(key, {})[leaf] = np.asarray(array).astype(np_dtype, copy=False)

  for (name, sub), array in _items(reader.embedder_and_final_norm()):
    put((name, sub), array)
  for i in range(cfg.num_layers):
    for path, array in _items(reader.block(i)):
      put((f"layer_{i}", *path), array)
  options = {}
  if jax.process_count() > 1:
    options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
        primary_host=0, active_processes={0})
  with atomic_output(out, directory=False, overwrite=overwrite) as tmp:
    ckpt = ocp.StandardCheckpointer(**options)
    ckpt.save(tmp, tree)
    ckpt.wait_until_finished()
    ckpt.close()
    _write_json(os.path.join(tmp, gemma_checkpoint.CONFIG_FILE), model_config_to_dict(cfg))
    if proto is not None:
      with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
        f.write(proto)


def _items(tree: dict, prefix: tuple[str, ...] = ()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _items(v, (*prefix, k))
    else:
      yield (*prefix, k), v


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Experiment directory holding checkpoints/.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("format", None, list(FORMATS), "Output format.")
  flags.DEFINE_string("out", None, "Output directory (hf, gemma, peft) or file (gguf).")
  flags.DEFINE_string("dtype", "float32", "float32/bfloat16/float16 (hf, gemma, peft); float32/"
                      "float16/bfloat16/q8_0 (gguf).")
  flags.DEFINE_string("base_model", "", "peft: the adapter config's base_model_name_or_path (an "
                      "HF hub id or the base's hf export; default: the run's config.lora.base).")
  flags.DEFINE_string("tokenizer", "", "SentencePiece model (default: WORKDIR/tokenizer.model, "
                      "then the training config's; none: weights and config only).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
  flags.DEFINE_float("max_shard_mb", 2048, "Largest safetensors shard (hf).")


def main(argv: Sequence[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  for name in ("workdir", "format", "out"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  try:
    done = export(FLAGS.workdir, FLAGS.format, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                  tokenizer=FLAGS.tokenizer, overwrite=FLAGS.overwrite,
                  max_shard_mb=FLAGS.max_shard_mb, base_model=FLAGS.base_model)
  except (ValueError, FileNotFoundError, FileExistsError,
          optional_packages.MissingPackageError) as e:
    raise SystemExit(f"export failed: {e}") from None
  if done:
    print(f"exported {FLAGS.workdir} ({FLAGS.format}, {FLAGS.dtype}) to {done.path}")
    if done.note:
      print(done.note)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
