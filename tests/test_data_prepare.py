"""prepare: formats, parallel workers, manifest, restart after a kill, and bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maxgemma.data import records
from maxgemma.data import tokenizer as tok_lib
from maxgemma.data.prepare import PrepareError, main, prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _texts(prefix: str, n: int) -> list[str]:
  return [f"{prefix} document {i}: value {i * 7919 % 1000} and  spaces\tand tabs."
          for i in range(n)]


def _write_jsonl(path, texts, field="text"):
  with open(path, "w") as f:
    for t in texts:
      f.write(json.dumps({field: t}) + "\n")
  return str(path)


def _decoded(directory: str, split: str | None = None) -> list[str]:
  """Every document in a prepared directory, decoded (checks bos/eos framing)."""
  from array_record.python.array_record_module import ArrayRecordReader
  m = records.read_manifest(directory)
  tok = tok_lib.load_tokenizer("")
  out = []
  for shard in m["shards"]:
    if split and shard["split"] != split:
      continue
    reader = ArrayRecordReader(os.path.join(directory, shard["file"]))
    for data in reader.read_all():
      ids, _ = records.decode_record(data, dtype=m["token_dtype"], sft=False)
      assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
      out.append(tok.decode(ids[1:-1]))
    reader.close()
  return out


def test_prepare_text_jsonl_parquet_in_parallel(tmp_path):
  jsonl = _write_jsonl(tmp_path / "a.jsonl", _texts("json", 300))
  paras = _texts("para", 40)
  (tmp_path / "b.txt").write_text("\n\n".join(p.replace(" and", "\nand", 1) for p in paras) + "\n")
  rows = _texts("parquet", 120)
  pq.write_table(pa.table({"text": rows, "other": list(range(120))}), tmp_path / "c.parquet",
                 row_group_size=30)
  out = str(tmp_path / "out")
  m = prepare([jsonl, str(tmp_path / "b.txt"), str(tmp_path / "c.parquet")], "", out,
              eval_fraction=0.2, workers=2, unit_mb=0.01, progress=False)
  assert m["documents"] == 460 and m["skipped"] == 0
  assert len({s["file"] for s in m["shards"]}) > 6  # several units per file, train + eval each
  expected = _texts("json", 300) + [p.replace(" and", "\nand", 1) for p in paras] + rows
  assert sorted(_decoded(out)) == sorted(expected)  # every document exactly once, exact text
  assert 0.1 < m["splits"]["eval"]["documents"] / 460 < 0.3
  assert m["tokens"] == sum(s["tokens"] for s in m["shards"])
  assert m["tokenizer"]["fingerprint"] == tok_lib.load_tokenizer("").fingerprint
  records.verify(out)  # sizes and per-shard sha256
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
  again = prepare([jsonl, str(tmp_path / "b.txt"), str(tmp_path / "c.parquet")], "", out,
                  eval_fraction=0.2, workers=2, unit_mb=0.01, progress=False)
  assert again == m  # a finished job is left as is


def test_cli_shows_progress_and_text_modes(tmp_path):
  (tmp_path / "t.txt").write_text("line one\nline two\n\nline three\n")
  proc = subprocess.run(
      [sys.executable, "-m", "maxgemma.data.prepare", f"--input={tmp_path}/t.txt",
       f"--output={tmp_path}/o", "--text_docs=line", "--workers=1"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert re.search(r"docs \([\d,]+/s\).*tokens \([\d,]+/s\).*ETA", proc.stderr), proc.stderr
  assert sorted(_decoded(f"{tmp_path}/o")) == ["line one", "line three", "line two"]
  m = prepare([f"{tmp_path}/t.txt"], "", f"{tmp_path}/p", text_docs="paragraph", progress=False)
  assert sorted(_decoded(f"{tmp_path}/p")) == ["line one\nline two", "line three"]
  prepare([f"{tmp_path}/t.txt"], "", f"{tmp_path}/f", text_docs="file", progress=False)
  assert _decoded(f"{tmp_path}/f") == ["line one\nline two\n\nline three\n"]
  assert m["documents"] == 2


def test_killed_job_resumes_without_duplicates_or_losses(tmp_path):
  texts = {}
  for k in range(30):
    texts[k] = _texts(f"file{k}", 1500)
    _write_jsonl(tmp_path / f"in{k:02d}.jsonl", texts[k])
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "maxgemma.data.prepare", f"--input={tmp_path}/in*.jsonl",
         f"--output={out}", "--workers=1", "--quiet"]
  proc = subprocess.Popen(cmd, cwd=REPO)
  first = out / ".progress" / "unit-00000.json"
  deadline = time.time() + 60
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "manifest.json").exists(), "the job finished before it could be killed"
  done = sorted(p.name for p in (out / ".progress").glob("unit-*.json"))
  assert 1 <= len(done) < 30
  with pytest.raises(FileNotFoundError, match="interrupted prepare"):
    records.read_manifest(str(out))  # an unfinished directory is never taken as complete
  mtimes = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.endswith("record")}
  other = tok_lib.train(sum(texts.values(), [])[:2000], 400, output=str(tmp_path / "o.model"))
  with pytest.raises(PrepareError, match="does not match"):
    prepare([f"{tmp_path}/in*.jsonl"], other.path, str(out), workers=1, progress=False)
  m = prepare([f"{tmp_path}/in*.jsonl"], "", str(out), workers=1, progress=False)
  assert m["documents"] == 30 * 1500
  assert sorted(_decoded(str(out))) == sorted(sum(texts.values(), []))
  assert all(os.stat(out / n).st_mtime_ns == t for n, t in mtimes.items())  # not redone
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
  records.verify(str(out))


def _run_cli(capsys, *args) -> tuple[int, str]:
  rc = main(list(args) + ["--quiet"])
  return rc, capsys.readouterr().err


def test_bad_input_errors_name_file_and_line(tmp_path, capsys):
  out = str(tmp_path / "out")
  rc, err = _run_cli(capsys, f"--input={tmp_path}/missing/*.jsonl", f"--output={out}")
  assert rc == 2 and "matched no files" in err
  (tmp_path / "empty.jsonl").write_text("")
  rc, err = _run_cli(capsys, f"--input={tmp_path}/empty.jsonl", f"--output={out}")
  assert rc == 2 and "empty.jsonl: the file is empty" in err
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n\n{"text": "broken",\n{"body": "x"}\n')
  rc, err = _run_cli(capsys, f"--input={bad}", f"--output={out}")
  assert rc == 2 and f"{bad}:3: malformed JSON" in err and "--skip_bad" in err
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  assert not [n for n in os.listdir(out) if n.endswith((".array_record", ".tmp"))]
  bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
  rc, err = _run_cli(capsys, f"--input={bad}", f"--output={tmp_path}/o2")
  assert rc == 2 and f"{bad}:2: no 'text' field (keys: body)" in err
  latin = tmp_path / "latin.txt"
  latin.write_bytes(b"fine line\n\ncaf\xe9 au lait\n")
  rc, err = _run_cli(capsys, f"--input={latin}", f"--output={tmp_path}/o3")
  assert rc == 2 and f"{latin}:3: not valid UTF-8" in err
  junk = tmp_path / "junk.parquet"
  junk.write_bytes(b"this is not parquet")
  rc, err = _run_cli(capsys, f"--input={junk}", f"--output={tmp_path}/o4")
  assert rc == 2 and "junk.parquet: not a readable Parquet file" in err
  pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocol.parquet")
  rc, err = _run_cli(capsys, f"--input={tmp_path}/nocol.parquet", f"--output={tmp_path}/o5")
  assert rc == 2 and "nocol.parquet: no column 'text' (columns: body)" in err
  (tmp_path / "x.csv").write_text("a,b\n")
  rc, err = _run_cli(capsys, f"--input={tmp_path}/x.csv", f"--output={tmp_path}/o6")
  assert rc == 2 and "x.csv: unknown input format" in err


def test_skip_bad_counts_records_in_manifest(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "one"}\n{"text": "two",\n{"body": 1}\n{"text": null}\n{"text": "ok"}\n')
  out = str(tmp_path / "out")
  rc, err = _run_cli(capsys, f"--input={bad}", f"--output={out}", "--skip_bad")
  assert rc == 0, err
  m = records.read_manifest(out)
  assert m["documents"] == 2 and m["skipped"] == 3
  assert any(e.startswith(f"{bad}:2: malformed JSON") for e in m["skipped_examples"])
  assert any(e.startswith(f"{bad}:4: text must be a string") for e in m["skipped_examples"])
  assert sorted(_decoded(out)) == ["ok", "one"]


def test_finished_output_refuses_another_tokenizer(tmp_path):
  src = _write_jsonl(tmp_path / "a.jsonl", _texts("x", 200))
  prepare([src], "", str(tmp_path / "out"), progress=False)
  other = tok_lib.train(_texts("y", 500), 400, output=str(tmp_path / "o.model"))
  with pytest.raises(PrepareError, match="does not match the one .* was prepared with"):
    prepare([src], other.path, str(tmp_path / "out"), progress=False)
  m = prepare([src], other.path, str(tmp_path / "out"), overwrite=True, progress=False)
  assert m["tokenizer"]["fingerprint"] == other.fingerprint


def test_worker_error_stops_the_job_without_a_manifest(tmp_path, capsys):
  good = _write_jsonl(tmp_path / "a.jsonl", _texts("a", 300))
  bad = tmp_path / "b.jsonl"
  bad.write_text('{"text": "fine"}\n' * 5 + "{oops\n")
  out = str(tmp_path / "out")
  rc, err = _run_cli(capsys, f"--input={good},{bad}", f"--output={out}", "--workers=2")
  assert rc == 2 and f"{bad}:6: malformed JSON" in err
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  assert not [n for n in os.listdir(out) if n.endswith(".tmp") and "00001" in n]


def _pairs(directory: str) -> list[tuple[list[int], list[int], list[int]]]:
  """Every (prompt, chosen, rejected) record of a prepared preference directory."""
  from array_record.python.array_record_module import ArrayRecordReader
  m = records.read_manifest(directory)
  out = []
  for shard in m["shards"]:
    reader = ArrayRecordReader(os.path.join(directory, shard["file"]))
    out += [tuple(x.tolist() for x in records.decode_preference(data, dtype=m["token_dtype"]))
            for data in reader.read_all()]
    reader.close()
  return out


def test_preference_pairs_round_trip_plain_chat_and_parquet(tmp_path):
  from maxgemma.data.chat import chat_template
  tok = tok_lib.load_tokenizer("")
  plain = [{"prompt": f"Question {i}: name a colour.", "chosen": f"Blue, number {i}.",
            "rejected": "I will not."} for i in range(30)]
  chats = [{"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": f"What is {i} + {i}?"}],
            "chosen": str(2 * i), "rejected": f"{2 * i + 1}, I think"} for i in range(20)]
  with open(tmp_path / "a.jsonl", "w") as f:
    for row in plain + chats:
      f.write(json.dumps(row) + "\n")
  table = [{"prompt": f"Parquet {i}", "chosen": "yes", "rejected": "no"} for i in range(10)]
  pq.write_table(pa.Table.from_pylist(table), tmp_path / "b.parquet")
  out = str(tmp_path / "out")
  m = prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")], "", out, kind="preference",
              eval_fraction=0.2, progress=False)
  assert m["kind"] == "preference" and m["documents"] == 60 and m["skipped"] == 0
  assert 0 < m["splits"]["eval"]["documents"] < 30
  pairs = _pairs(out)
  assert m["tokens"] == sum(len(p) + len(c) + len(r) for p, c, r in pairs)
  got = sorted((tok.decode(p), tok.decode(c), tok.decode(r)) for p, c, r in pairs)
  want = [(row["prompt"], row["chosen"], row["rejected"]) for row in plain + table]
  want += [(chat_template(row["messages"], add_generation_prompt=True),
            row["chosen"] + "<end_of_turn>", row["rejected"] + "<end_of_turn>") for row in chats]
  assert got == sorted(want)
  for p, c, r in pairs:  # bos opens the prompt; eos closes a plain answer (chat: <end_of_turn>)
    chat = tok.decode(p).startswith("<start_of_turn>")
    assert p[0] == tok.bos_id and tok.bos_id not in p[1:]
    assert (c[-1] == tok.eos_id and r[-1] == tok.eos_id) != chat


def test_bad_preference_rows_name_file_line_and_field(tmp_path, capsys):
  good = {"prompt": "p", "chosen": "a", "rejected": "b"}
  rows = [good, {"prompt": "p", "chosen": "a"}, {"prompt": "p", "chosen": "", "rejected": "b"},
          {"prompt": "p", "chosen": "a", "rejected": 3}, {"chosen": "a", "rejected": "b"},
          {"prompt": " ", "chosen": "a", "rejected": "b"},
          {"prompt": "p", "messages": [{"role": "user", "content": "q"}], "chosen": "a",
           "rejected": "b"},
          {"messages": [{"role": "user", "content": "q"}, {"role": "model", "content": "x"}],
           "chosen": "a", "rejected": "b"},
          {"messages": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}]
  bad = tmp_path / "bad.jsonl"
  bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
  expected = {2: "'rejected' is missing", 3: "'chosen' is empty",
              4: "'rejected' must be a string (the model's answer), got int",
              5: "no 'prompt' or 'messages' field (keys: chosen, rejected)",
              6: "'prompt' is empty", 7: "both 'prompt' and 'messages': give one",
              8: "'messages' must end with a user turn", 9: "bad chat 'messages': message 0 has "
              "role 'robot'"}
  rc, err = _run_cli(capsys, f"--input={bad}", f"--output={tmp_path}/o", "--kind=preference")
  assert rc == 2 and f"{bad}:2: {expected[2]}. Fix the record, or re-run with --skip_bad" in err
  assert len(err.strip().splitlines()) == 1, err
  rc, err = _run_cli(capsys, f"--input={bad}", f"--output={tmp_path}/o2", "--kind=preference",
                     "--skip_bad")
  assert rc == 0, err
  m = records.read_manifest(f"{tmp_path}/o2")
  assert m["documents"] == 1 and m["skipped"] == len(expected)
  for line, reason in expected.items():
    assert any(e.startswith(f"{bad}:{line}: {reason}") for e in m["skipped_examples"]), (
        line, m["skipped_examples"])
  rc, err = _run_cli(capsys, f"--input={bad}", f"--output={tmp_path}/o3", "--kind=preference",
                     "--text_field=text")
  assert rc == 2 and "--text_field='text' does not apply to --kind=preference" in err
