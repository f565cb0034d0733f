"""Tokenizer: Gemma settings, exact round trips, special ids, chat template."""

import pytest

from maxgemma.data import tokenizer as tok_lib
from maxgemma.data.chat import chat_segments, chat_template

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 40))\n",
    "Numbers like 1234567 and 3.14159 are split into digits.\n",
    "Whitespace:  two spaces,\ttab, and\n\nblank lines.\n",
] * 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "t.model")
  return tok_lib.train(_CORPUS, 420, output=path), path


def test_trained_tokenizer_has_gemma_layout(trained):
  tok, _ = trained
  assert tok.vocab_size == 420
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.id_to_piece(106) == "<start_of_turn>" and tok.id_to_piece(107) == "<end_of_turn>"
  assert tok.id_to_piece(4) == "<mask>" and tok.id_to_piece(7) == "<unused0>"
  assert tok.piece_to_id("<unused98>") == 105


@pytest.mark.parametrize("text", [
    "  leading spaces, trailing   \n",
    "tabs\t\tand\r\nCRLF and\n\n\nnewlines",
    "digits 0 12 345 6789 3.14159 -42",
    "unknown: 🦜 ∮ 中文 naïve Ωmega \u200b zero-width",
    "",
    "<start_of_turn>user\nhi<end_of_turn>\n",
])
def test_round_trip_is_exact(trained, text):
  tok, _ = trained
  assert tok.decode(tok.encode(text)) == text


def test_byte_fallback_digits_and_no_dummy_prefix(trained):
  tok, _ = trained
  ids = tok.encode("🦜")  # not in the vocabulary: four UTF-8 byte pieces
  assert [tok.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]
  assert tok.unk_id not in tok.encode("中文 ∮ 🦜")
  assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
  assert not tok.id_to_piece(tok.encode("The")[0]).startswith("\u2581")  # no dummy prefix
  assert tok.encode("<start_of_turn>") == [106]


def test_load_from_disk_keeps_ids_and_fingerprint(trained):
  tok, path = trained
  loaded = tok_lib.load(path)
  assert loaded.fingerprint == tok.fingerprint
  assert (loaded.pad_id, loaded.eos_id, loaded.bos_id, loaded.unk_id) == (0, 1, 2, 3)
  assert loaded.encode("Numbers 12") == tok.encode("Numbers 12")
  assert tok.encode("hi", add_bos=True, add_eos=True)[0] == 2
  assert tok.encode("hi", add_bos=True, add_eos=True)[-1] == 1


def test_demo_tokenizer_is_gemma_format_with_2048_pieces():
  tok = tok_lib.load_tokenizer("")
  assert tok.vocab_size == 2048
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.piece_to_id("<start_of_turn>") == 106 and tok.piece_to_id("<end_of_turn>") == 107
  assert all(tok.id_to_piece(i) == f"<unused{i - 7}>" for i in range(7, 106))
  text = "Return the sum of 1234 and x\t(unicode: é, 🦜)\n"
  assert tok.decode(tok.encode(text)) == text


def test_train_rejects_too_small_vocab_and_corpus():
  with pytest.raises(ValueError, match="too small"):
    tok_lib.train(_CORPUS, 300)
  with pytest.raises(ValueError, match="corpus is too small"):
    tok_lib.train(["tiny corpus"] * 3, 2000)


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tok_lib.load(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model"):
    tok_lib.load(str(bad))


def test_chat_template_matches_gemma_format():
  messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Bye"}]
  assert chat_template(messages) == (
      "<start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
      "<start_of_turn>user\nBye<end_of_turn>\n")
  assert chat_template(messages[:1], add_generation_prompt=True).endswith(
      "<end_of_turn>\n<start_of_turn>model\n")
  system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  assert chat_template(system) == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
  trained = [text for text, on in chat_segments(messages) if on]
  assert trained == ["Hello.", "<end_of_turn>"]


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "robot", "content": "x"}], "role 'robot'"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only allowed first"),
])
def test_chat_template_rejects_bad_messages(messages, match):
  with pytest.raises(ValueError, match=match):
    chat_template(messages)


def test_train_tokenizer_cli_reads_jsonl(tmp_path):
  import json

  from maxgemma.data.train_tokenizer import main
  src = tmp_path / "c.jsonl"
  src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _CORPUS))
  assert main([f"--input={src}", "--vocab_size=420", f"--output={tmp_path}/t.model"]) == 0
  tok = tok_lib.load(str(tmp_path / "t.model"))
  assert tok.vocab_size == 420 and tok.decode(tok.encode(_CORPUS[1])) == _CORPUS[1]
  assert main([f"--input={tmp_path}/none*.jsonl", "--vocab_size=400",
               f"--output={tmp_path}/u.model"]) == 2
