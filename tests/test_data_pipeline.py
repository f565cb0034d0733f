"""The grain pipeline: batch contract, packing, mixtures, eval split, SFT, resume, sharding."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from maxgemma.config import base_config
from maxgemma.data import tokenizer as tok_lib
from maxgemma.data.pipeline import make_eval_iterator, make_train_iterator
from maxgemma.data.prepare import prepare
from maxgemma.data.sources import parse_sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DOCS = 200


def _doc(i: int) -> str:
  return f"doc {i:04d} " + "some words here " * (i % 23)


def _jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  out = {}
  src = _jsonl(d / "docs.jsonl", [{"text": _doc(i)} for i in range(N_DOCS)])
  out["docs"] = str(d / "docs")
  prepare([src], "", out["docs"], workers=1, progress=False)
  src = _jsonl(d / "split.jsonl", [{"text": _doc(i)} for i in range(N_DOCS)])
  out["split"] = str(d / "split")
  out["split_manifest"] = prepare([src], "", out["split"], eval_fraction=0.25, workers=1,
                                  progress=False)
  numbers = ["".join(str(i * j % 10) for j in range(5 + i % 9)) for i in range(150)]
  digits = _jsonl(d / "digits.jsonl", [{"text": t} for t in numbers])
  letters = _jsonl(d / "letters.jsonl", [{"text": "xyzzy" * (1 + i % 4)} for i in range(150)])
  out["digits"], out["letters"] = str(d / "digits"), str(d / "letters")
  prepare([digits], "", out["digits"], workers=1, progress=False)
  prepare([letters], "", out["letters"], workers=1, progress=False)
  chats = [{"messages": [{"role": "system", "content": "Be terse."},
                         {"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i}"},
                         {"role": "user", "content": "thanks"},
                         {"role": "model", "content": f"bye {i}"}]} for i in range(60)]
  out["sft"] = str(d / "sft")
  prepare([_jsonl(d / "chat.jsonl", chats)], "", out["sft"], kind="sft", workers=1,
          progress=False)
  return out


def _cfg(sources: str, **kw):
  c = base_config().data
  c.sources = sources
  for k, v in kw.items():
    c[k] = v
  return c


def _doc_ids() -> dict[tuple, int]:
  tok = tok_lib.load_tokenizer("")
  return {tuple([tok.bos_id, *tok.encode(_doc(i)), tok.eos_id]): i for i in range(N_DOCS)}


def _segments(batch):
  """(tokens, targets, weights, positions) of every packed segment in a batch."""
  for b in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][b]
    for s in sorted(set(seg.tolist()) - {0}):
      idx = np.flatnonzero(seg == s)
      yield (batch["tokens"][b, idx], batch["targets"][b, idx], batch["loss_weights"][b, idx],
             batch["positions"][b, idx])


def test_batch_contract(data):
  it = make_train_iterator(_cfg(data["docs"]), seq_len=48, global_batch=8, seed=0, shards=[2, 3])
  batch = next(it)
  assert set(batch) == {"tokens", "targets", "positions", "segment_ids", "loss_weights"}
  for k, v in batch.items():
    assert v.shape == (2, 48), k  # two loader shards of one row each
    assert v.dtype == (np.float32 if k == "loss_weights" else np.int32), k
  with pytest.raises(ValueError, match=r"config.data.loader_shards=3 must divide "
                                       r"train.global_batch=8 .* such as 8"):
    make_train_iterator(_cfg(data["docs"], loader_shards=3), seq_len=48, global_batch=8, seed=0)
  with pytest.raises(ValueError, match=r"loader shards \[4\] are not distinct indices in \[0, 4\)"):
    make_train_iterator(_cfg(data["docs"], loader_shards=4), seq_len=48, global_batch=8, seed=0,
                        shards=[4])
  it.close()


def test_the_global_batch_does_not_depend_on_how_loader_shards_are_split(data):
  """All loader shards in one iterator == the same shards split over several (processes)."""
  cfg = _cfg(data["docs"], loader_shards=4)
  whole = make_train_iterator(cfg, seq_len=40, global_batch=8, seed=2)
  parts = [make_train_iterator(cfg, seq_len=40, global_batch=8, seed=2, shards=s)
           for s in ([0], [1, 2], [3])]
  for _ in range(6):
    a = next(whole)
    b = [next(p) for p in parts]
    for k in a:
      assert (a[k] == np.concatenate([x[k] for x in b])).all(), k
  for it in [whole, *parts]:
    it.close()


@pytest.mark.parametrize("files,shards", [(1, 8), (3, 8), (4, 4), (10, 4), (7, 3)])
def test_loader_shards_cover_every_document_once(files, shards):
  from maxgemma.data.pipeline import shard_documents
  file_docs = [11 + 5 * f for f in range(files)]
  seen = []
  for j in range(shards):
    runs = shard_documents(file_docs, j, shards)
    assert len({f for f, *_ in runs}) == len(runs)
    if files >= shards:  # whole files: a host fetches only the files of its loader shards
      assert all(first == 0 and stride == 1 for _, first, stride, _ in runs)
    else:
      assert len(runs) == 1
    seen += [(f, first + stride * i) for f, first, stride, n in runs for i in range(n)]
  assert sorted(seen) == [(f, r) for f in range(files) for r in range(file_docs[f])]


def test_packing_never_leaks_across_documents(data):
  docs = _doc_ids()
  joined = {" ".join(map(str, d)) + " " for d in docs}
  it = make_train_iterator(_cfg(data["docs"]), seq_len=40, global_batch=8, seed=3)
  starts = 0
  for _ in range(25):
    batch = next(it)
    seg, pos, w = batch["segment_ids"], batch["positions"], batch["loss_weights"]
    for b in range(seg.shape[0]):
      real = np.flatnonzero(seg[b])
      assert (seg[b, real] >= 1).all() and (np.diff(real) == 1).all()  # padding only at the end
      assert (w[b, seg[b] == 0] == 0).all() and (pos[b, seg[b] == 0] == 0).all()
      changes = np.flatnonzero(np.diff(seg[b, real]) != 0) + 1
      assert (pos[b, real[changes]] == 0).all() and pos[b, 0] == 0  # restart at each segment
      assert (np.diff(seg[b, real])[changes - 1] == 1).all()  # ids 1, 2, 3, ...
    for tokens, targets, weights, positions in _segments(batch):
      assert (positions == np.arange(len(tokens))).all()
      assert (targets[:-1] == tokens[1:]).all() and (weights == 1).all()
      piece = " ".join(map(str, [*tokens, targets[-1]])) + " "
      assert any(piece in d for d in joined), "a segment is not a slice of one document"
      starts += tokens[0] == 2
  assert starts > 50  # most segments are whole documents starting with bos
  assert 0.8 < it.packing_efficiency <= 1.0
  unpacked = make_train_iterator(_cfg(data["docs"], packing=False), seq_len=40, global_batch=8,
                                 seed=3)
  for _ in range(25):
    next(unpacked)
  assert unpacked.packing_efficiency < it.packing_efficiency
  it.close()
  unpacked.close()


def test_mixture_proportions_over_10k_rows(data):
  assert parse_sources(f"{data['digits']}:3, {data['letters']}") == [(data["digits"], 3.0),
                                                                    (data["letters"], 1.0)]
  assert parse_sources("gs://b/x/*.array_record:0.5,gs://b/y") == [
      ("gs://b/x/*.array_record", 0.5), ("gs://b/y", 1.0)]
  tok = tok_lib.load_tokenizer("")
  digit_ids = {tok.piece_to_id(str(d)) for d in range(10)}
  # Rows are mixed after packing, so packing does not change proportions; off here for speed.
  it = make_train_iterator(_cfg(f"{data['digits']}:3,{data['letters']}:1", packing=False,
                                loader_shards=8), seq_len=16, global_batch=200, seed=0)
  from_digits = rows = 0
  for _ in range(50):
    tokens = next(it)["tokens"]
    for row in tokens:
      body = set(row.tolist()) - {0, 1, 2}
      assert body <= digit_ids or not body & digit_ids  # one source per row
      from_digits += body <= digit_ids
      rows += 1
  assert rows == 10_000
  assert abs(from_digits / rows - 0.75) < 0.01  # stated tolerance: 1 point
  it.close()


def test_eval_split_is_held_out_and_repeatable(data):
  docs = _doc_ids()
  cfg = _cfg(data["split"], eval_sources="")
  seen = {"train": set(), "eval": set()}
  for split, make in (("train", make_train_iterator), ("eval", make_eval_iterator)):
    it = make(cfg, seq_len=256, global_batch=4, seed=0)
    for _ in range(10):
      for tokens, targets, _, _ in _segments(next(it)):
        seen[split].add(docs[tuple([*tokens, targets[-1]])])
    it.close()
  assert seen["eval"] and not seen["train"] & seen["eval"]
  assert len(seen["eval"]) == data["split_manifest"]["splits"]["eval"]["documents"]
  first = [make_eval_iterator(cfg, seq_len=64, global_batch=4, seed=0) for _ in range(2)]
  for _ in range(3):
    a, b = next(first[0]), next(first[1])
    assert all((a[k] == b[k]).all() for k in a)
  with pytest.raises(ValueError, match="no 'eval' documents"):
    make_eval_iterator(_cfg(data["docs"]), seq_len=64, global_batch=4, seed=0)


def test_same_seed_same_batches_other_seed_other_batches(data):
  def first(seed):
    it = make_train_iterator(_cfg(data["docs"]), seq_len=32, global_batch=4, seed=seed)
    out = [next(it)["tokens"] for _ in range(4)]
    it.close()
    return np.stack(out)
  assert (first(5) == first(5)).all()
  assert (first(5) != first(6)).any()


def test_tokenizer_mismatch_is_a_clear_error(data, tmp_path):
  other = tok_lib.train([_doc(i) for i in range(N_DOCS)] * 3, 400,
                        output=str(tmp_path / "o.model"))
  with pytest.raises(ValueError, match="prepared with tokenizer fingerprint .* config.data.tok"):
    make_train_iterator(_cfg(data["docs"], tokenizer=other.path), seq_len=32, global_batch=4,
                        seed=0)
  with pytest.raises(ValueError, match="matched no prepared"):
    make_train_iterator(_cfg(str(tmp_path / "nothing*")), seq_len=32, global_batch=4, seed=0)


def test_sft_loss_weights_only_on_model_turns(data):
  tok = tok_lib.load_tokenizer("")
  it = make_train_iterator(_cfg(data["sft"]), seq_len=128, global_batch=4, seed=0)
  checked = 0
  for _ in range(5):
    for tokens, targets, weights, _ in _segments(next(it)):
      assert tokens[0] == tok.bos_id and tok.decode(tokens).startswith("<start_of_turn>user\n")
      i = re.search(r"question (\d+)", tok.decode(tokens)).group(1)
      trained = tok.decode(targets[weights > 0])
      assert trained == f"answer {i}<end_of_turn>bye {i}<end_of_turn>"
      assert "question" not in tok.decode(targets[weights > 0])
      checked += 1
  assert checked >= 20
  it.close()


def test_restore_with_other_settings_is_refused(data):
  it = make_train_iterator(_cfg(data["docs"]), seq_len=32, global_batch=4, seed=0)
  next(it)
  state = it.get_state()
  other = make_train_iterator(_cfg(data["docs"]), seq_len=64, global_batch=4, seed=0)
  with pytest.raises(ValueError, match=r"seq_len: saved 32, now 64 \(config.train.seq_len\)"):
    other.set_state(state)
  it.close()
  other.close()


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import orbax.checkpoint as ocp
    from maxgemma.config import base_config
    from maxgemma.data.checkpointing import data_restore_args, data_save_args
    from maxgemma.data.pipeline import make_train_iterator

    def main():
      a = json.loads(sys.argv[1])
      c = base_config().data
      for k, v in a["cfg"].items():
        c[k] = v
      it = make_train_iterator(c, seq_len=a["seq_len"], global_batch=a["global_batch"], seed=7)
      if a["mode"] == "rows":
        batches = [next(it) for _ in range(a["n"])]
        np.save(a["out"], np.stack([np.stack([b["tokens"], b["targets"]]) for b in batches]))
        return
      mngr = ocp.CheckpointManager(a["ckpt"], options=ocp.CheckpointManagerOptions(
          enable_async_checkpointing=False))
      if a["mode"] == "save":
        for _ in range(a["n"]):
          next(it)
        mngr.save(a["n"], args=ocp.args.Composite(data=data_save_args(it)))
      else:
        mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=data_restore_args(it)))
        np.save(a["out"], np.stack([next(it)["tokens"] for _ in range(a["n"])]))
      mngr.close()
      it.close()

    if __name__ == "__main__":
      main()
""")


def _child(tmp_path, **args) -> subprocess.Popen:
  script = tmp_path / "child.py"
  script.write_text(_CHILD)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, str(script), json.dumps(args)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen) -> None:
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out


def test_exact_resume_in_a_fresh_process_with_orbax(data, tmp_path):
  """Uninterrupted (in-process, worker_count=0) == save after N / restore in a new process
  (worker_count=1, worker-process prefetch)."""
  n, m = 6, 5
  cfg = {"sources": data["docs"], "worker_count": 1}
  it = make_train_iterator(_cfg(data["docs"]), seq_len=32, global_batch=4, seed=7)
  reference = np.stack([next(it)["tokens"] for _ in range(n + m)])
  it.close()
  common = dict(cfg=cfg, seq_len=32, global_batch=4, ckpt=str(tmp_path / "ck"))
  _wait(_child(tmp_path, mode="save", n=n, **common))
  assert (tmp_path / "ck" / str(n) / "data" / "shard_00003-of-00004.json").exists()
  _wait(_child(tmp_path, mode="restore", n=m, out=str(tmp_path / "resumed.npy"), **common))
  resumed = np.load(tmp_path / "resumed.npy")
  assert (resumed == reference[n:]).all()


def test_loader_shards_read_disjoint_documents_covering_each_once(data):
  docs = _doc_ids()
  cfg = _cfg(data["docs"], packing=False)  # one document per row
  seen = []
  for shard in range(2):
    it = make_train_iterator(cfg, seq_len=160, global_batch=2, seed=7, shards=[shard])
    rows = [next(it) for _ in range(N_DOCS // 2)]
    it.close()
    seen.append([docs[(*b["tokens"][0][b["tokens"][0] > 0].tolist(),
                       b["targets"][0][b["tokens"][0] > 0][-1])] for b in rows])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(N_DOCS))  # each document exactly once


def test_shards_saved_by_two_owners_resume_in_one_iterator(data, tmp_path):
  """Two "processes" each write the loader shards they own; one iterator resumes them all."""
  import orbax.checkpoint as ocp

  from maxgemma.data.checkpointing import data_restore_args, data_save_args
  cfg = _cfg(data["docs"], loader_shards=4)
  reference = make_train_iterator(cfg, seq_len=32, global_batch=8, seed=1)
  expected = [next(reference)["tokens"] for _ in range(7)][3:]
  parts = [make_train_iterator(cfg, seq_len=32, global_batch=8, seed=1, shards=s)
           for s in ([0, 1], [0, 1], [2, 3])]  # the first two hold the same rows
  parts[1].owned = ()
  for _ in range(3):
    for p in parts:
      next(p)
  for i, p in enumerate(parts):
    mngr = ocp.CheckpointManager(str(tmp_path / "ck"), options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False))
    if i == 0:
      mngr.save(3, args=ocp.args.Composite(data=data_save_args(p)))
    else:  # the other writers add their files to the finished item (as on a shared disk)
      from maxgemma.data.checkpointing import DataIteratorHandler, DataSave
      DataIteratorHandler().save(tmp_path / "ck" / "3" / "data", DataSave(p))
    mngr.close()
  names = sorted(os.listdir(tmp_path / "ck" / "3" / "data"))
  assert [n for n in names if n.startswith("shard_")] == [
      f"shard_{j:05d}-of-00004.json" for j in range(4)]
  fresh = make_train_iterator(cfg, seq_len=32, global_batch=8, seed=1)
  mngr = ocp.CheckpointManager(str(tmp_path / "ck"))
  mngr.restore(3, args=ocp.args.Composite(data=data_restore_args(fresh)))
  for e in expected:
    assert (next(fresh)["tokens"] == e).all()
  other = make_train_iterator(_cfg(data["docs"], loader_shards=4, packing=False), seq_len=32,
                              global_batch=8, seed=1)
  with pytest.raises(ValueError, match=r"cannot continue the data stream .*packing: saved True, "
                                       r"now False \(config.data.packing\)"):
    mngr.restore(3, args=ocp.args.Composite(data=data_restore_args(other)))
  mngr.close()
  for it in [reference, *parts, fresh, other]:
    it.close()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_shuffle_is_a_seeded_permutation(n):
  from maxgemma.data.shuffle import permute
  a = permute(np.arange(n), n, seed=11)
  assert sorted(a.tolist()) == list(range(n))
  assert (permute(np.arange(n), n, seed=11) == a).all()
  if n >= 64:
    assert (permute(np.arange(n), n, seed=12) != a).any()
    assert (a != np.arange(n)).mean() > 0.9


def test_async_orbax_save_records_the_position_at_save_time(data, tmp_path):
  import orbax.checkpoint as ocp

  from maxgemma.data.checkpointing import data_restore_args, data_save_args
  cfg = _cfg(data["docs"])
  it = make_train_iterator(cfg, seq_len=32, global_batch=4, seed=1)
  for _ in range(3):
    next(it)
  mngr = ocp.CheckpointManager(str(tmp_path / "ck"))  # async saving (the trainer's default)
  mngr.save(3, args=ocp.args.Composite(data=data_save_args(it)))
  expected = next(it)["tokens"]
  for _ in range(4):
    next(it)  # training goes on while the save completes
  mngr.wait_until_finished()
  fresh = make_train_iterator(cfg, seq_len=32, global_batch=4, seed=1)
  restored = mngr.restore(3, args=ocp.args.Composite(data=data_restore_args(fresh)))
  assert restored["data"] is fresh
  assert (next(fresh)["tokens"] == expected).all()
  mngr.close()
  it.close()
  fresh.close()
