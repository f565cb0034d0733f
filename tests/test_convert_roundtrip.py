"""maxgemma -> hf / gguf / gemma -> maxgemma is bit-exact in float32, for Gemma 1, 2 and 3.

Real files on disk both ways: the checkpoint is exported with `maxgemma.export`, imported into a
new workdir with `maxgemma.import_weights`, and read back with `load_params`; the tokenizer
comes along (rebuilt from metadata for GGUF) and the trainer's restore path puts the imported
params straight onto a mesh.
"""

import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxgemma.checkpoint import Checkpointer, load_params
from maxgemma.data.tokenizer import load_tokenizer
from maxgemma.export import export
from maxgemma.import_weights import import_weights
from maxgemma.model.params import stack_layers
from tests.convert_utils import PRESETS, make_workdir

FORMATS = {"hf": "", "gguf": ".gguf", "gemma": ""}
TEXT = "Hello world 12345 <start_of_turn>user\n  tabs\tand ünïcödé ✓ 🙂<end_of_turn>"


@pytest.fixture(scope="module", params=PRESETS)
def source(request, tmp_path_factory):
  return make_workdir(str(tmp_path_factory.mktemp("src")), request.param)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip_is_bit_exact(source, fmt, tmp_path):
  workdir, cfg, official = source
  out = str(tmp_path / f"export{FORMATS[fmt]}")
  export(workdir, fmt, out)
  back = str(tmp_path / "imported")
  import_weights(fmt, out, back)
  params, cfg2, step = load_params(back)
  assert cfg2 == cfg and step == 0
  want = stack_layers(official)
  assert jax.tree.structure(params) == jax.tree.structure(want)
  for path, a in jax.tree_util.tree_leaves_with_path(want):
    b = params
    for k in path:
      b = b[k.key]
    assert b.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(b).view(np.uint32), a.view(np.uint32),
                                  err_msg=f"{fmt} {jax.tree_util.keystr(path)}")
  ours, theirs = load_tokenizer(""), load_tokenizer(os.path.join(back, "tokenizer.model"))
  if fmt == "gguf":  # rebuilt from tokens/scores/types: same pieces, same encoding
    assert [theirs.id_to_piece(i) for i in range(theirs.vocab_size)] == [
        ours.id_to_piece(i) for i in range(ours.vocab_size)]
    assert theirs.encode(TEXT, add_bos=True) == ours.encode(TEXT, add_bos=True)
  else:
    assert theirs.model_proto == ours.model_proto


def test_imported_checkpoint_restores_onto_a_mesh(source, tmp_path):
  workdir, cfg, official = source
  out = str(tmp_path / "hf")
  export(workdir, "hf", out)
  back = str(tmp_path / "imported")
  import_weights("hf", out, back)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
  want = stack_layers(official)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)
  # Shard the first axis that divides by 8 (vocab rows, d_model...), replicate the rest.
  spec = lambda x: PartitionSpec(*[("data" if i == next(
      (j for j, n in enumerate(x.shape) if n % 8 == 0), None) else None)
      for i in range(len(x.shape))])
  shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), abstract)
  ckpt = Checkpointer(back, read_only=True)
  restored = ckpt.restore(0, {"params": abstract}, {"params": shardings})["params"]
  ckpt.close()
  emb = restored["embedder"]["input_embedding"]
  assert len(emb.sharding.device_set) == 8 and emb.sharding.spec == PartitionSpec("data", None)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)
