"""Input token estimates and bounds of one request, and its output bound: no tokenizer needed.

No tokenizer is downloaded or bundled: providers tokenize differently (OpenAI's o200k and cl100k,
Anthropic's unpublished one, Gemini's SentencePiece) and their vocabularies would have to be fetched
at run time. Instead each line gets an estimate between two bounds:

- at least one token per whitespace-separated word of the prompt text, and at least 1 (holds for
  tokenizers whose pre-tokenization splits at whitespace: OpenAI's cl100k/o200k, Llama 3,
  SentencePiece's default);
- at most one token per UTF-8 byte of the text (a byte-level BPE or byte-fallback token covers at
  least one byte), plus 4 tokens of framing per chat message and 3 to prime the reply, plus the JSON
  of tools, functions and response formats counted byte for byte, plus 1,600 tokens per image or
  audio part (their real cost depends on size and detail, which Sluice does not fetch);
- the estimate itself: UTF-8 bytes / 4, OpenAI's rule of thumb for English (about 4 characters per
  token), plus the framing, kept within the bounds. It is a rule of thumb, not a measurement: it
  runs low on code, numbers and non-Latin scripts. Token arrays (`prompt`/`input` given as token
  ids) are counted exactly.

Output tokens are bounded by the line's own `max_completion_tokens` / `max_tokens` /
`max_output_tokens` (times `n` choices), 0 for embeddings; a line without one is bounded by the
provider's `default_max_tokens` option, else `DEFAULT_OUTPUT_BOUND`, and counted in
`lines_without_max_tokens`. The cost range is [min input tokens, no output] to [max input tokens,
output bound] at the line's batch price, so the cost actually charged falls inside it whenever the
provider counts within the bounds above (the word bound is the one a provider could undercut).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

DEFAULT_OUTPUT_BOUND = 4096
MESSAGE_FRAMING = 4
REPLY_FRAMING = 3
MEDIA_TOKENS = 1600
BYTES_PER_TOKEN = 4
METHOD = ("input tokens: UTF-8 bytes / 4 (a rule of thumb for English, not a tokenizer), between bounds of "
          ">= 1 token per whitespace-separated word and <= 1 token per UTF-8 byte plus message framing; "
          "output tokens: bounded by max_tokens, or where unset by the provider's default_max_tokens or 4096")
_MEDIA_PARTS = {"image_url", "input_image", "input_audio", "image", "audio", "file", "input_file"}
# ASCII whitespace (what str.split splits at) -> " ", anything else -> "x": the words of an ASCII
# text are the "x" runs, counted in C.
_ASCII_SPACES = bytes(0x20 if chr(b).isspace() else 0x78 for b in range(128)) + b"x" * 128
_STRUCTURE_KEYS = ("tools", "functions", "response_format", "tool_choice", "text")


@dataclass
class _Text:
    """The prompt text of one request, and what cannot be read as text."""

    words: int = 0
    bytes: int = 0
    framing: int = 0
    exact_tokens: int = 0
    extra_max: int = 0

    def add(self, text: str) -> None:
        if text.isascii():
            marks = text.encode("ascii").translate(_ASCII_SPACES)
            self.words += marks.count(b" x") + (marks[:1] == b"x")  # len(text.split()), 5x faster
            self.bytes += len(text)
        else:
            self.words += len(text.split())
            self.bytes += len(text.encode())

    def add_content(self, content: Any) -> None:
        """A message's `content`: a string, or a list of parts."""
        if isinstance(content, str):
            self.add(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, str):
                    self.add(part)
                elif isinstance(part, dict):
                    if isinstance(part.get("text"), str):
                        self.add(part["text"])
                    elif part.get("type") in _MEDIA_PARTS:
                        self.extra_max += MEDIA_TOKENS
                    else:
                        self.add_json(part)
        elif content is not None:
            self.add_json(content)

    def add_json(self, value: Any) -> None:
        """Structure the model reads as text (tools, schemas, tool calls): its JSON, byte for byte."""
        self.extra_max += len(json.dumps(value, separators=(",", ":")).encode())

    def add_prompt(self, value: Any) -> None:
        """`prompt` / `input`: a string, a list of strings, token ids or lists of token ids."""
        if isinstance(value, str):
            self.add(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, int):
                    self.exact_tokens += 1
                elif isinstance(item, list) and all(isinstance(t, int) for t in item):
                    self.exact_tokens += len(item)
                else:
                    self.add_prompt(item)

    def add_messages(self, messages: Any) -> None:
        for message in messages if isinstance(messages, list) else ():
            if not isinstance(message, dict):
                continue
            self.framing += MESSAGE_FRAMING
            self.add_content(message.get("content"))
            for key in ("tool_calls", "function_call"):
                if message.get(key) is not None:
                    self.add_json(message[key])
        self.framing += REPLY_FRAMING if messages else 0


def _text_of(url: str, body: dict[str, Any]) -> _Text:
    text = _Text()
    if url == "/v1/chat/completions":
        text.add_messages(body.get("messages"))
    elif url == "/v1/responses":
        if isinstance(body.get("instructions"), str):
            text.add(body["instructions"])
        value = body.get("input")
        if isinstance(value, list) and any(isinstance(item, dict) for item in value):
            text.add_messages(value)
        else:
            text.add_prompt(value)
    elif url == "/v1/embeddings":
        text.add_prompt(body.get("input"))
    else:
        text.add_prompt(body.get("prompt"))
    if isinstance(body.get("system"), str):
        text.add(body["system"])
    for key in _STRUCTURE_KEYS:
        if body.get(key) is not None:
            text.add_json(body[key])
    return text


def whole_number(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


def own_output(url: str, body: dict[str, Any]) -> tuple[int | None, int]:
    """The line's own output limit (None when it sets none; 0 for embeddings) and its choices."""
    if url == "/v1/embeddings":
        return 0, 1
    own = None
    for key in ("max_output_tokens",) if url == "/v1/responses" else ("max_completion_tokens", "max_tokens"):
        if (own := whole_number(body.get(key))) is not None:
            break
    n, best_of = body.get("n"), body.get("best_of")  # usually absent: 1 choice
    if n is None and best_of is None:
        return own, 1
    return own, max(whole_number(n) or 1, whole_number(best_of) or 1)


@dataclass(frozen=True)
class LineTokens:
    """One request's input tokens (estimate within [min, max]) and its output bound."""

    input_min: int
    input_estimate: int
    input_max: int
    output_max: int
    bounded: bool


@dataclass(slots=True)  # one per line of an upload: a frozen dataclass's __init__ costs more than counting
class BodyTokens:
    """What a request's body alone says of its tokens: an upload keeps this for each line (the
    provider's default output bound, which applies when the line sets none, is known only once
    the line is routed)."""

    input_min: int
    input_estimate: int
    input_max: int
    own_output: int | None
    choices: int

    def output_max(self, default_output: int) -> int:
        """The most output tokens the line can be charged for: its own limit, else `default_output`."""
        return (self.own_output if self.own_output is not None else default_output) * self.choices

    def bounded_by(self, default_output: int) -> LineTokens:
        """The line's tokens, its output bounded by its own limit or else by `default_output`."""
        return LineTokens(self.input_min, self.input_estimate, self.input_max, self.output_max(default_output),
                          self.own_output is not None)


def body_tokens(url: str, body: dict[str, Any]) -> BodyTokens:
    text = _text_of(url, body)
    low = max(text.words + text.exact_tokens, 1)
    high = max(text.bytes + text.exact_tokens + text.framing + text.extra_max, low)
    guess = math.ceil(text.bytes / BYTES_PER_TOKEN) + text.exact_tokens + text.framing
    own, choices = own_output(url, body)
    return BodyTokens(low, min(max(guess, low), high), high, own, choices)


def line_tokens(url: str, body: dict[str, Any], default_output: int = DEFAULT_OUTPUT_BOUND) -> LineTokens:
    return body_tokens(url, body).bounded_by(default_output)
