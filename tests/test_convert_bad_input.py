"""Bad input fails with one clear error before anything is written, leaving no partial output."""

import json
import os
import shutil

import gguf
import numpy as np
import pytest

from maxgemma.export import export
from maxgemma.import_weights import import_weights
from tests.convert_utils import make_workdir


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bad"))
  workdir, cfg, _ = make_workdir(root, "tiny_gemma2")
  export(workdir, "hf", os.path.join(root, "hf"))
  export(workdir, "gguf", os.path.join(root, "m.gguf"))
  return root, workdir


def assert_nothing_written(workdir: str) -> None:
  assert not os.path.exists(workdir), os.listdir(workdir)


def copy_hf(root: str, dst: str) -> str:
  shutil.copytree(os.path.join(root, "hf"), dst)
  return dst


def test_unsupported_hf_architecture(exports, tmp_path):
  root, _ = exports
  path = copy_hf(root, str(tmp_path / "llama"))
  cfg_path = os.path.join(path, "config.json")
  config = json.load(open(cfg_path))
  config["model_type"] = "llama"
  json.dump(config, open(cfg_path, "w"))
  with pytest.raises(ValueError, match=r"config.json: model_type 'llama' is not supported"):
    import_weights("hf", path, str(tmp_path / "wd"))
  assert_nothing_written(str(tmp_path / "wd"))


def test_unsupported_gguf_architecture(tmp_path):
  path = str(tmp_path / "llama.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=r"architecture 'llama' is not supported"):
    import_weights("gguf", path, str(tmp_path / "wd"))
  assert_nothing_written(str(tmp_path / "wd"))


def test_config_that_does_not_match_tensors_names_them(exports, tmp_path):
  root, _ = exports
  path = copy_hf(root, str(tmp_path / "hf"))
  cfg_path = os.path.join(path, "config.json")
  config = json.load(open(cfg_path))
  config["num_hidden_layers"] = 5  # the file holds 4 layers
  config["layer_types"] = config["layer_types"] + ["sliding_attention"]
  config["intermediate_size"] = 256  # and 128-wide feed-forwards
  json.dump(config, open(cfg_path, "w"))
  with pytest.raises(ValueError) as e:
    import_weights("hf", path, str(tmp_path / "wd"))
  msg = str(e.value)
  assert "missing: model.layers.4." in msg
  assert "model.layers.0.mlp.down_proj.weight (96, 128) (config expects (96, 256))" in msg
  assert_nothing_written(str(tmp_path / "wd"))


def test_truncated_safetensors(exports, tmp_path):
  root, _ = exports
  path = copy_hf(root, str(tmp_path / "hf"))
  st = os.path.join(path, "model.safetensors")
  os.truncate(st, os.path.getsize(st) - 100)
  with pytest.raises(ValueError, match=r"model.safetensors is truncated"):
    import_weights("hf", path, str(tmp_path / "wd"))
  assert_nothing_written(str(tmp_path / "wd"))


def test_truncated_gguf(exports, tmp_path):
  root, _ = exports
  path = str(tmp_path / "cut.gguf")
  shutil.copy(os.path.join(root, "m.gguf"), path)
  os.truncate(path, os.path.getsize(path) - 1000)
  with pytest.raises(ValueError, match=r"cut.gguf .*truncated"):
    import_weights("gguf", path, str(tmp_path / "wd"))
  assert_nothing_written(str(tmp_path / "wd"))


def test_unknown_quantization_type(exports, tmp_path):
  root, _ = exports
  path = str(tmp_path / "odd.gguf")
  shutil.copy(os.path.join(root, "m.gguf"), path)
  reader = gguf.GGUFReader(path)
  t = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
  type_offset = t.field.offset + sum(p.nbytes for p in t.field.parts[:4])
  del reader
  with open(path, "r+b") as f:  # overwrite the tensor's type id with one GGML never defined
    f.seek(type_offset)
    f.write(np.uint32(250).tobytes())
  with pytest.raises(ValueError, match=r"tensor blk.1.attn_q.weight has unknown quantization "
                                       r"type id 250"):
    import_weights("gguf", path, str(tmp_path / "wd"))
  assert_nothing_written(str(tmp_path / "wd"))


def test_import_refuses_a_workdir_with_checkpoints(exports, tmp_path):
  root, workdir = exports
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    import_weights("hf", os.path.join(root, "hf"), workdir)


def test_failed_export_leaves_nothing(exports, tmp_path):
  _, workdir = exports
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match="more than the model's 2048 embedding rows"):
    export(workdir, "hf", out, tokenizer=_big_tokenizer(tmp_path))
  assert os.listdir(tmp_path) == ["big.model"]  # no out, no temporary left behind
  export(workdir, "gguf", out)
  with pytest.raises(FileExistsError, match="--overwrite"):
    export(workdir, "gguf", out)


def _big_tokenizer(tmp_path) -> str:
  from maxgemma.data.tokenizer import load_tokenizer, train  # noqa: PLC0415
  texts = [load_tokenizer("").decode(range(4, 2048))] * 4 + [f"word{i} " * 3 for i in range(3000)]
  path = str(tmp_path / "big.model")
  train(texts, 2304, output=path)
  return path


def test_export_failing_midway_leaves_nothing(tmp_path):
  workdir, _, _ = make_workdir(str(tmp_path / "src"), "tiny_gemma3")
  params_dir = os.path.join(workdir, "checkpoints", "7", "params")
  for dirpath, _, files in os.walk(params_dir):  # lose the array data, keep the metadata
    if os.path.basename(dirpath) == "d":
      for name in files:
        os.remove(os.path.join(dirpath, name))
  for fmt in ("hf", "gguf", "gemma"):
    with pytest.raises(ValueError, match="cannot be (read|opened)"):
      export(workdir, fmt, str(tmp_path / "out" / fmt))
    assert os.listdir(tmp_path / "out") == []
