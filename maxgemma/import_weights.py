"""Import released or exported weights into a maxgemma workdir (a checkpoint `train` continues).

  python -m maxgemma.import_weights --from=hf|gguf|gemma --path=PATH --workdir=DIR
      [--preset=NAME] [--tokenizer=FILE] [--step=0]

  hf     a transformers directory (config.json + safetensors, sharded or not; any float dtype)
  gguf   a GGUF file (F32/F16/BF16 and quantized tensors such as Q8_0, Q4_K, Q6_K: dequantized)
  gemma  an official orbax checkpoint (flat `transformer/...` or nested layout); its config comes
         from --preset, from our export's maxgemma_config.json, or from matching a known preset

The model config is inferred from the file and checked against every tensor name and shape
before anything is written. Weights are read one tensor at a time into the scanned float32 tree
(one copy of the model), saved as a params-only checkpoint (`train` starts a fresh optimizer and
restores the params straight onto its mesh), and the tokenizer goes to WORKDIR/tokenizer.model
(`--tokenizer`, `tokenizer.model` next to the weights, or rebuilt from GGUF metadata), with
WORKDIR/tokenizer.json naming where it came from, or that the source carried none.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from maxgemma import optional_packages, storage
from maxgemma.convert import gemma_checkpoint, hf
from maxgemma.convert.orbax_arrays import OrbaxArrays, nest
from maxgemma.convert.safetensors_io import SafetensorsDir
from maxgemma.convert.workdir_tokenizer import find_tokenizer, record_tokenizer
from maxgemma.model.config import ModelConfig
from maxgemma.model.gemma import Transformer
from maxgemma.model.presets import get_preset

FORMATS = ("hf", "gguf", "gemma")


class Source:
  """Weights of one model in some format: config, tokenizer, and layer-by-layer reads."""

  config: ModelConfig
  tokenizer: bytes | None  # the SentencePiece model the source carries, if any
  tokenizer_origin: str  # where `tokenizer` was found (or where it was looked for)

  def embedder_and_final_norm(self) -> dict:
    """The `embedder` and `final_norm` subtrees (everything outside the layers)."""
    raise NotImplementedError

  def block(self, i: int) -> dict:
    raise NotImplementedError


def _check_names(found: dict[str, tuple], want: dict[str, tuple], where: str,
                 ignore: tuple[str, ...] = ()) -> None:
  missing = sorted(want.keys() - found.keys())
  extra = sorted(n for n in found.keys() - want.keys() if n not in ignore)
  wrong = sorted(f"{n} {tuple(found[n])} (config expects {tuple(want[n])})"
                 for n in want.keys() & found.keys() if tuple(found[n]) != tuple(want[n]))
  if missing or extra or wrong:
    raise ValueError(gemma_checkpoint.describe_mismatch(where, missing, extra, wrong))


class HFSource(Source):
  def __init__(self, path: str):
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"{config_path} does not exist: --path must be a transformers "
                              "model directory")
    with open(config_path) as f:
      self.config = hf.config_from_hf(json.load(f), config_path)
    self.files = SafetensorsDir(path)
    found = {n: self.files.shape(n) for n in self.files.names()}
    _check_names(found, hf.hf_shapes(self.config), f"{path} vs its config.json",
                 ignore=("lm_head.weight",))
    self.tokenizer_origin = os.path.join(os.path.abspath(path), "tokenizer.model")
    self.tokenizer = _read_if_file(self.tokenizer_origin)

  def _get(self, name: str) -> np.ndarray:
    return self.files.read(name).astype(np.float32, copy=False)

  def embedder_and_final_norm(self) -> dict:
    return {"embedder": {"input_embedding": self._get(hf.EMBED)},
            "final_norm": {"scale": self._get(hf.FINAL_NORM)}}

  def block(self, i: int) -> dict:
    return hf.layer_from_hf(self._get, self.config, i)


class GGUFSource(Source):
  def __init__(self, path: str):
    optional_packages.require("gguf")
    from maxgemma.convert import gguf_format  # noqa: PLC0415

    self.fmt = gguf_format
    self.file = gguf_format.GGUFFile(path)
    self.config = gguf_format.config_from_metadata(self.file.reader, path)
    family = self.config.family
    want = {gguf_format.gguf_name(n, family): s for n, s in hf.hf_shapes(self.config).items()}
    found = {n: self.file.shape(n) for n in self.file.tensors}
    _check_names(found, want, f"{path} vs its metadata", ignore=("output.weight",))
    self.tokenizer = gguf_format.tokenizer_from_metadata(self.file.reader, path)
    self.tokenizer_origin = f"the tokenizer.ggml metadata of {os.path.abspath(path)}"

  def _get(self, hf_name: str) -> np.ndarray:
    name = self.fmt.gguf_name(hf_name, self.config.family)
    return self.file.read_scale(name) if self.fmt.is_norm(name) else self.file.read(name)

  def embedder_and_final_norm(self) -> dict:
    return {"embedder": {"input_embedding": self._get(hf.EMBED)},
            "final_norm": {"scale": self._get(hf.FINAL_NORM)}}

  def block(self, i: int) -> dict:
    return hf.layer_from_hf(self._get, self.config, i)


class GemmaSource(Source):
  def __init__(self, path: str, preset: str = ""):
    self.arrays = OrbaxArrays(path)
    self.paths = {gemma_checkpoint.from_stored(k): k for k in self.arrays.keys}
    shapes = {p: self.arrays.shape(k) for p, k in self.paths.items()}
    sidecar = os.path.join(path, gemma_checkpoint.CONFIG_FILE)
    if preset:
      self.config = get_preset(preset)
    elif os.path.isfile(sidecar):
      from maxgemma.checkpoint import model_config_from_dict  # noqa: PLC0415
      with open(sidecar) as f:
        self.config = model_config_from_dict(json.load(f)).validate()
    else:
      cfg = gemma_checkpoint.infer_config(shapes)
      if cfg is None:
        raise ValueError(f"{path}: an official checkpoint carries no config and its shapes match "
                         "no single known preset; pass --preset=NAME")
      self.config = cfg
    gemma_checkpoint.check_shapes(shapes, self.config, f"{path} vs config")
    self.tokenizer_origin = os.path.join(os.path.abspath(path), "tokenizer.model")
    self.tokenizer = _read_if_file(self.tokenizer_origin)

  def _subtree(self, first: str) -> dict:
    return nest({p[1:]: self.arrays.read(k).astype(np.float32, copy=False)
                 for p, k in self.paths.items() if p[0] == first})

  def embedder_and_final_norm(self) -> dict:
    return {"embedder": self._subtree("embedder"), "final_norm": self._subtree("final_norm")}

  def block(self, i: int) -> dict:
    return self._subtree(f"layer_{i}")


def _read_if_file(path: str) -> bytes | None:
  if not os.path.isfile(path):
    return None
  with open(path, "rb") as f:
    return f.read()


def open_source(fmt: str, path: str, preset: str = "") -> Source:
  if fmt not in FORMATS:
    raise ValueError(f"--from={fmt!r}; allowed: {', '.join(FORMATS)}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  if fmt == "hf":
    return HFSource(path)
  if fmt == "gguf":
    return GGUFSource(path)
  return GemmaSource(path, preset)


def scanned_tree(source: Source, cfg: ModelConfig,
                 progress: Callable[[int], None] | None = None) -> dict:
  """The scanned float32 parameter tree, filled one layer at a time (one copy of the model)."""
  model = Transformer(cfg.replace(scan_layers=True))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
  params = jax.tree.map(lambda s: np.empty(s.shape, np.float32), shapes["params"])
  g = source.embedder_and_final_norm()
  params["embedder"]["input_embedding"][...] = g["embedder"]["input_embedding"]
  params["final_norm"]["scale"][...] = g["final_norm"]["scale"]
  del g
  for i in range(cfg.num_layers):
    blk = source.block(i)
    jax.tree.map(lambda dst, src, i=i: dst.__setitem__(i, src), params["layers"], blk)
    del blk
    if progress:
      progress(i)
  return params


def import_weights(fmt: str, path: str, workdir: str, *, preset: str = "", tokenizer: str = "",
                   step: int = 0) -> ModelConfig:
  """Reads, checks and converts `path`, then writes WORKDIR's checkpoint and tokenizer."""
  from maxgemma.data.tokenizer import Tokenizer, load  # noqa: PLC0415

  source = open_source(fmt, path, preset)  # every check happens here, before any write
  cfg = source.config
  if tokenizer:
    proto, origin = load(tokenizer).model_proto, f"--tokenizer={storage.absolute(tokenizer)}"
  elif source.tokenizer is not None:
    proto, origin = source.tokenizer, source.tokenizer_origin
  else:
    proto, origin = None, (f"imported from {os.path.abspath(path)} ({fmt}), which carries no "
                           f"tokenizer ({source.tokenizer_origin} is missing)")
  if proto is not None:
    tok = Tokenizer(proto)
    if tok.vocab_size > cfg.vocab_size:
      raise ValueError(f"the tokenizer ({origin}) has {tok.vocab_size} pieces, more than the "
                       f"model's {cfg.vocab_size} embedding rows")
  existing = storage.path(workdir) / "checkpoints"
  if existing.is_dir() and any(p.name.isdigit() for p in existing.iterdir()):
    raise FileExistsError(f"{existing} already holds checkpoints; import into a new --workdir")
  params = scanned_tree(source, cfg)
  record_tokenizer(workdir, proto, origin)
  save_params_checkpoint(workdir, step, params, cfg, {"import_weights": {
      "format": fmt, "path": os.path.abspath(path), "tokenizer": origin if proto else None}})
  return cfg


def save_params_checkpoint(workdir: str, step: int, params: dict, cfg: ModelConfig,
                           config: dict) -> None:
  """A params-only checkpoint laid out as `maxgemma.checkpoint.Checkpointer` writes it.

  Same items (`params`, `meta`), same orbax PyTree/OCDBT format, so `Checkpointer.restore` and
  `load_params` read it; but the arrays are written without zstd compression and without orbax's
  defensive host copy: both would hold another copy of the model while writing (float weights
  barely compress anyway). Orbax writes the step to a temporary directory and renames it.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from maxgemma.checkpoint import CHECKPOINT_DIR, model_config_to_dict  # noqa: PLC0415

  manager = ocp.CheckpointManager(
      storage.join(storage.absolute(workdir), CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
      item_handlers={"params": ocp.PyTreeCheckpointHandler(use_compression=False),
                     "meta": ocp.JsonCheckpointHandler()})
  meta = {"step": int(step), "model": model_config_to_dict(cfg), "config": config}
  with _no_host_copies():
    manager.save(int(step), args=ocp.args.Composite(params=ocp.args.PyTreeSave(params),
                                                    meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
  manager.close()


@contextlib.contextmanager
def _no_host_copies():
  """Orbax deep-copies numpy arrays before writing them (a second copy of the model); our tree
  is not touched during the save, so the copy is switched off for it."""
  from orbax.checkpoint import type_handlers  # noqa: PLC0415

  original = type_handlers.get_type_handler(np.ndarray)
  type_handlers.register_type_handler(
      np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False), override=True)
  try:
    yield
  finally:
    type_handlers.register_type_handler(np.ndarray, original, override=True)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_enum("from", None, list(FORMATS), "Input format.")
  flags.DEFINE_string("path", None, "HF directory, GGUF file or orbax checkpoint directory.")
  flags.DEFINE_string("workdir", None, "New experiment directory to write.")
  flags.DEFINE_string("preset", "", "Model preset (only needed for official gemma checkpoints "
                      "whose shapes match no single preset).")
  flags.DEFINE_string("tokenizer", "", "SentencePiece model to use instead of the file's own.")
  flags.DEFINE_integer("step", 0, "Step number of the written checkpoint.")


def main(argv: Sequence[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  fmt = FLAGS["from"].value
  for name, value in (("from", fmt), ("path", FLAGS.path), ("workdir", FLAGS.workdir)):
    if not value:
      raise app.UsageError(f"--{name} is required")
  try:
    cfg = import_weights(fmt, FLAGS.path, FLAGS.workdir, preset=FLAGS.preset,
                         tokenizer=FLAGS.tokenizer, step=FLAGS.step)
  except (ValueError, FileNotFoundError, FileExistsError,
          optional_packages.MissingPackageError) as e:
    raise SystemExit(f"import failed: {e}") from None
  print(f"imported {FLAGS.path} ({fmt}): {cfg.family}, {cfg.num_layers} layers, d_model "
        f"{cfg.d_model}, vocab {cfg.vocab_size} -> {FLAGS.workdir}/checkpoints/{FLAGS.step}")
  if find_tokenizer(FLAGS.workdir).path is None:
    print(f"no tokenizer: {FLAGS.path} carries none; pass --tokenizer=FILE here, or to export "
          "and sample later")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
