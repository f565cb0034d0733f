"""SentencePiece tokenizer: load any model (Gemma's included) or train one with Gemma's settings."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from maxgemma import storage
from maxgemma.data.chat import END_OF_TURN, START_OF_TURN, chat_template

__all__ = ["Tokenizer", "chat_template", "demo_tokenizer_path", "gemma_special_pieces", "load",
           "load_tokenizer", "train"]

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN_ID, END_OF_TURN_ID = 106, 107


def gemma_special_pieces() -> list[str]:
  """Gemma's user-defined pieces for ids 4..107: mask, 2mass, [@BOS@], 99 unused, turn markers."""
  return (["<mask>", "<2mass>", "[@BOS@]"] + [f"<unused{i}>" for i in range(99)]
          + [START_OF_TURN, END_OF_TURN])


def demo_tokenizer_path() -> str:
  """Path of the packaged demo tokenizer (2048 pieces, Gemma's special ids)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer.model")


class Tokenizer:
  """A SentencePiece model with Gemma's conventions. Picklable (worker processes rebuild it)."""

  def __init__(self, model_proto: bytes, path: str = ""):
    self._proto = bytes(model_proto)
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

  def __getstate__(self) -> dict:
    return {"proto": self._proto, "path": self.path}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["proto"], state["path"])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def fingerprint(self) -> str:
    """sha256 of the serialized model (first 16 hex digits): names the exact vocabulary."""
    return hashlib.sha256(self._proto).hexdigest()[:16]

  @property
  def model_proto(self) -> bytes:
    return self._proto

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text` (no bos/eos unless asked)."""
    return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False,
                   num_threads: int = 1) -> list[list[int]]:
    """Token ids of many texts at once."""
    return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; control tokens (pad, bos, eos) decode to nothing."""
    return self._sp.decode([int(i) for i in ids])

  def chat_template(self, messages, *, add_generation_prompt: bool = False) -> str:
    """Gemma chat rendering of `messages` (see `maxgemma.data.chat`)."""
    return chat_template(messages, add_generation_prompt=add_generation_prompt)

  def save(self, path: str) -> None:
    storage.path(path).write_bytes(self._proto)

  def __repr__(self) -> str:
    return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, fp={self.fingerprint})"


def load(path: str) -> Tokenizer:
  """Loads a SentencePiece `.model` file; raises a clear error when it is missing or invalid."""
  file = storage.path(path)
  if not file.is_file():
    raise FileNotFoundError(f"tokenizer {path!r} does not exist: pass a SentencePiece .model file")
  proto = file.read_bytes()
  try:
    return Tokenizer(proto, path)
  except Exception as e:  # sentencepiece raises RuntimeError/OSError with little context
    raise ValueError(f"tokenizer {path!r} is not a valid SentencePiece model: {e}") from None


def load_tokenizer(path: str = "") -> Tokenizer:
  """`load(path)`, or the packaged demo tokenizer when `path` is empty."""
  return load(path or demo_tokenizer_path())


def train(texts: Iterable[str], vocab_size: int, *, output: str | None = None,
          character_coverage: float = 0.9995, max_sentence_length: int = 1 << 16,
          num_threads: int = 2, input_sentence_size: int = 0) -> Tokenizer:
  """Trains a BPE tokenizer with Gemma's settings on `texts` (one document each).

  BPE, byte fallback (any Unicode round-trips), digits split, no dummy prefix, whitespace kept
  as is (identity normalization), pad 0 / eos 1 / bos 2 / unk 3 and Gemma's 104 user-defined
  pieces at ids 4..107 (`<start_of_turn>` 106, `<end_of_turn>` 107). The model has exactly
  `vocab_size` pieces; writes it to `output` when given.
  """
  specials = gemma_special_pieces()
  if vocab_size < 4 + len(specials) + 256 + 16:
    raise ValueError(f"vocab_size={vocab_size} is too small for Gemma's {4 + len(specials)} "
                     "special pieces and 256 byte pieces")
  model = io.BytesIO()
  try:
    _train_sp(texts, model, vocab_size, specials, character_coverage, max_sentence_length,
              num_threads, input_sentence_size)
  except RuntimeError as e:
    raise ValueError(f"could not train {vocab_size} pieces (the corpus is too small?): "
                     f"{str(e).splitlines()[0]}") from None
  tok = Tokenizer(model.getvalue(), output or "")
  if tok.vocab_size != vocab_size:
    raise ValueError(f"trained {tok.vocab_size} pieces, not {vocab_size}: the corpus is too small")
  if output:
    tok.save(output)
  return tok


def _train_sp(texts, model, vocab_size, specials, character_coverage, max_sentence_length,
              num_threads, input_sentence_size) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
      byte_fallback=True, split_digits=True, add_dummy_prefix=False,
      remove_extra_whitespaces=False, normalization_rule_name="identity",
      allow_whitespace_only_pieces=True, split_by_whitespace=True,
      character_coverage=character_coverage, max_sentence_length=max_sentence_length,
      input_sentence_size=input_sentence_size, shuffle_input_sentence=False,
      pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
      pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      user_defined_symbols=specials, hard_vocab_limit=True, num_threads=num_threads,
      minloglevel=2)
