"""Supervised fine-tuning input: chat `messages` -> token ids with a loss mask on model turns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from maxgemma.data.chat import chat_segments
from maxgemma.data.tokenizer import Tokenizer


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]
                ) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32, mask uint8) of a conversation: bos + Gemma chat template.

  mask[i] = 1 where token i is the model's to produce (its content and `<end_of_turn>`); the
  pipeline turns it into loss weights on the targets that predict those tokens.
  """
  segments = chat_segments(messages)
  pieces = tokenizer.encode_batch([text for text, _ in segments])
  ids, mask = [tokenizer.bos_id], [0]
  for (_, trained), piece in zip(segments, pieces, strict=True):
    ids += piece
    mask += [int(trained)] * len(piece)
  return np.asarray(ids, np.int32), np.asarray(mask, np.uint8)
