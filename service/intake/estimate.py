"""Token and cost estimates of a batch before it runs (EstimateBatch, and budget reservations).

No tokenizer is downloaded or bundled: providers tokenize differently (OpenAI's o200k and cl100k,
Anthropic's, Gemini's SentencePiece) and their vocabularies would have to be fetched at run time.
Instead each line gets an estimate and two bounds that hold for the byte-level BPE and
SentencePiece tokenizers these providers use:

- at least one token per whitespace-separated word of the prompt text (their pre-tokenizers never
  join two words into one token), and at least 1;
- at most one token per UTF-8 byte of the text (every token covers at least one byte), plus 4
  tokens of framing per chat message and 3 to prime the reply, plus the JSON of tools, functions
  and response formats counted byte for byte, plus 1,600 tokens per image or audio part;
- the estimate itself: UTF-8 bytes / 4 (OpenAI's rule of thumb for English: typically within
  ±25% on English prose, more on code, numbers and non-Latin scripts, where it tends to be low)
  plus the framing, kept within the bounds. Token arrays (`prompt`/`input` given as token ids)
  are counted exactly.

Output tokens are bounded by the line's own `max_completion_tokens` / `max_tokens` /
`max_output_tokens` (times `n` choices), 0 for embeddings; a line without one is bounded by the
provider's `default_max_tokens` option, else `DEFAULT_OUTPUT_BOUND`, and counted in
`lines_without_max_tokens`. The cost range is [min input tokens, no output] to [max input tokens,
output bound] at the line's batch price, so the cost actually charged falls inside it whenever the
provider's tokenizer obeys the bounds above.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from service.domain.model import Price, Usage
from service.providers.routing import Route, Router

DEFAULT_OUTPUT_BOUND = 4096
MESSAGE_FRAMING = 4
REPLY_FRAMING = 3
MEDIA_TOKENS = 1600
BYTES_PER_TOKEN = 4
METHOD = ("bytes/4 estimate (typically within ±25% on English text) between hard bounds for byte-level BPE "
          "and SentencePiece tokenizers: >= 1 token per whitespace-separated word, <= 1 token per UTF-8 byte "
          "plus message framing; output bounded by max_tokens (or a default where unset)")
_MEDIA_PARTS = {"image_url", "input_image", "input_audio", "image", "audio", "file", "input_file"}
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


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


def output_bound(url: str, body: dict[str, Any], default: int) -> tuple[int, bool]:
    """The most output tokens the line can be charged for, and whether that is the line's own limit."""
    if url == "/v1/embeddings":
        return 0, True
    keys = ("max_output_tokens",) if url == "/v1/responses" else ("max_completion_tokens", "max_tokens")
    own = next((v for k in keys if (v := _int(body.get(k))) is not None), None)
    choices = max(_int(body.get("n")) or 1, _int(body.get("best_of")) or 1)
    return (own if own is not None else default) * choices, own is not None


@dataclass(frozen=True)
class LineTokens:
    """One request's input tokens (estimate within [min, max]) and its output bound."""

    input_min: int
    input_estimate: int
    input_max: int
    output_max: int
    bounded: bool


def line_tokens(url: str, body: dict[str, Any], default_output: int = DEFAULT_OUTPUT_BOUND) -> LineTokens:
    text = _text_of(url, body)
    low = max(text.words + text.exact_tokens, 1)
    high = max(text.bytes + text.exact_tokens + text.framing + text.extra_max, low)
    guess = math.ceil(text.bytes / BYTES_PER_TOKEN) + text.exact_tokens + text.framing
    output, bounded = output_bound(url, body, default_output)
    return LineTokens(low, min(max(guess, low), high), high, output, bounded)


@dataclass
class PartTally:
    """The sums over one part's lines."""

    lines: int = 0
    input_min: int = 0
    input_estimate: int = 0
    input_max: int = 0
    output_max: int = 0
    unbounded: int = 0
    cost_min: float = 0.0
    cost_max: float = 0.0
    prices: set[Price] = field(default_factory=set)


@dataclass
class Estimator:
    """Tallies each checked line into its part (LineValidator calls `add`)."""

    router: Router
    parts: dict[int, PartTally] = field(default_factory=dict)

    def add(self, part_no: int, route: Route, url: str, body: dict[str, Any]) -> None:
        entry = self.router.entry(route.provider)
        default = _int(entry.provider.options.get("default_max_tokens")) or DEFAULT_OUTPUT_BOUND
        tokens = line_tokens(url, body, default)
        price = entry.price(route.model)
        tally = self.parts.setdefault(part_no, PartTally())
        tally.lines += 1
        tally.input_min += tokens.input_min
        tally.input_estimate += tokens.input_estimate
        tally.input_max += tokens.input_max
        tally.output_max += tokens.output_max
        tally.unbounded += 0 if tokens.bounded else 1
        tally.cost_min += price.cost(Usage(input_tokens=tokens.input_min)).total_cost
        tally.cost_max += price.cost(Usage(input_tokens=tokens.input_max, output_tokens=tokens.output_max)).total_cost
        tally.prices.add(price)

    @property
    def cost_max(self) -> float:
        return sum(t.cost_max for t in self.parts.values())
