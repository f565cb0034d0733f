"""The Gemma chat template: `<start_of_turn>ROLE\\n...<end_of_turn>\\n` turns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
_ROLES = {"user": "user", "model": "model", "assistant": "model", "system": "system"}


def _normalize(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
  """(role, content) pairs with roles mapped to Gemma's and a system turn merged into the next."""
  if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
    raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
  turns: list[tuple[str, str]] = []
  system: str | None = None
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
      raise ValueError(f"message {i} must be an object with 'role' and 'content'")
    role, content = message["role"], message["content"]
    if role not in _ROLES:
      raise ValueError(f"message {i} has role {role!r}; expected one of {sorted(_ROLES)}")
    if not isinstance(content, str):
      raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
    role = _ROLES[role]
    if role == "system":
      if i != 0:
        raise ValueError(f"message {i}: a system message is only allowed first")
      system = content
      continue
    if system is not None:  # Gemma has no system role: it opens the first user turn.
      if role != "user":
        raise ValueError("a system message must be followed by a user message")
      content, system = f"{system}\n\n{content}", None
    turns.append((role, content))
  if system is not None:
    raise ValueError("a system message must be followed by a user message")
  return turns


def chat_segments(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False
                  ) -> list[tuple[str, bool]]:
  """The rendered conversation as (text, trained) pieces: trained marks the model's own tokens.

  The model's content and its `<end_of_turn>` are trained (so it learns to stop); the turn
  headers, the user's text and the newline after each turn are not.
  """
  segments: list[tuple[str, bool]] = []
  for role, content in _normalize(messages):
    model = role == "model"
    segments += [(f"{START_OF_TURN}{role}\n", False), (content, model), (END_OF_TURN, model),
                 ("\n", False)]
  if add_generation_prompt:
    segments.append((f"{START_OF_TURN}model\n", False))
  return [(text, trained) for text, trained in segments if text]


def chat_template(messages: Sequence[Mapping[str, str]], *,
                  add_generation_prompt: bool = False) -> str:
  """Renders `messages` ({'role', 'content'}) in Gemma's format (no bos: the encoder adds it)."""
  return "".join(text for text, _ in chat_segments(messages,
                                                     add_generation_prompt=add_generation_prompt))
