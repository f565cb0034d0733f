"""Preference pairs (for DPO): a source row -> (prompt, chosen, rejected) token ids -> one row.

Shape letters: L length (train.seq_len).

A source row is either plain text, `{"prompt", "chosen", "rejected"}` (prompt: bos + its tokens;
each answer: its tokens + eos), or chat, `{"messages", "chosen", "rejected"}`: `messages` are the
prompt's turns (ending with a user turn), rendered with the Gemma chat template and the opening of
the model's turn, each answer the model's text followed by `<end_of_turn>`, tokenized piece by
piece as `maxgemma.data.sft.encode_chat` does.

`pack_pair` lays a pair out in one [L] row: segment 1 is the prompt followed by the chosen answer,
segment 2 the same prompt followed by the rejected answer (0 is padding), loss weight 1 on the
answer targets.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from maxgemma.data.chat import END_OF_TURN, chat_segments
from maxgemma.data.tokenizer import Tokenizer

CHOSEN, REJECTED = 1, 2  # the segment ids of the two sides of a row's pair
ANSWERS = ("chosen", "rejected")


def _answer_text(row: Mapping, field: str) -> str:
  if field not in row or row[field] is None:
    raise ValueError(f"{field!r} is missing")
  value = row[field]
  if not isinstance(value, str):
    raise ValueError(f"{field!r} must be a string (the model's answer), got "
                     f"{type(value).__name__}")
  if not value.strip():
    raise ValueError(f"{field!r} is empty")
  return value


def encode_pair(tokenizer: Tokenizer, row: object) -> tuple[list[int], list[int], list[int]]:
  """(prompt, chosen, rejected) token ids of one source row; a ValueError naming the field of a
  row that is not a usable pair."""
  if not isinstance(row, Mapping):
    raise ValueError(f"expected a JSON object with 'prompt' (or 'messages'), 'chosen' and "
                     f"'rejected', got {type(row).__name__}")
  has_prompt, has_messages = row.get("prompt") is not None, row.get("messages") is not None
  if has_prompt == has_messages:
    keys = ", ".join(sorted(row)[:8]) or "none"
    raise ValueError("both 'prompt' and 'messages': give one" if has_prompt else
                      f"no 'prompt' or 'messages' field (keys: {keys})")
  chosen, rejected = (_answer_text(row, f) for f in ANSWERS)
  if has_prompt:
    prompt = row["prompt"]
    if not isinstance(prompt, str):
      raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
      raise ValueError("'prompt' is empty")
    p, c, r = tokenizer.encode_batch([prompt, chosen, rejected])
    return [tokenizer.bos_id, *p], [*c, tokenizer.eos_id], [*r, tokenizer.eos_id]
  messages = row["messages"]
  try:
    segments = chat_segments(messages, add_generation_prompt=True)
  except ValueError as e:
    raise ValueError(f"bad chat 'messages': {e}") from None
  if messages[-1]["role"] != "user":
    raise ValueError("'messages' must end with a user turn (the model's answers are 'chosen' "
                     "and 'rejected')")
  texts = [text for text, _ in segments]
  pieces = tokenizer.encode_batch([*texts, chosen, rejected, END_OF_TURN])
  end = pieces[-1]
  prompt_ids = [tokenizer.bos_id] + [i for piece in pieces[:len(texts)] for i in piece]
  return prompt_ids, [*pieces[-3], *end], [*pieces[-2], *end]


def pair_length(prompt: list[int], chosen: list[int], rejected: list[int]) -> int:
  """The row slots a pair takes: (prompt + chosen) + (prompt + rejected), one target less each."""
  return 2 * len(prompt) + len(chosen) + len(rejected) - 2


def pack_pair(prompt: list[int], chosen: list[int], rejected: list[int], seq_len: int
              ) -> dict[str, np.ndarray] | None:
  """One preference row ([seq_len] arrays: segment 1 prompt + chosen, segment 2 prompt +
  rejected, answer targets weighted 1), or None when the pair does not fit in `seq_len`."""
  if not len(prompt) or not len(chosen) or not len(rejected):
    raise ValueError("a preference pair needs a non-empty prompt, chosen and rejected answer")
  row = {k: np.zeros(seq_len, np.int32) for k in ("tokens", "targets", "positions",
                                                  "segment_ids")}
  row["loss_weights"] = np.zeros(seq_len, np.float32)
  start = 0
  for segment, answer in ((CHOSEN, chosen), (REJECTED, rejected)):
    seq = list(prompt) + list(answer)
    n = len(seq) - 1
    if start + n > seq_len:
      return None
    span = slice(start, start + n)
    row["tokens"][span], row["targets"][span] = seq[:-1], seq[1:]
    row["positions"][span], row["segment_ids"][span] = np.arange(n), segment
    row["loss_weights"][start + len(prompt) - 1:start + n] = 1.0
    start += n
  return row
