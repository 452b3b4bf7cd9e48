"""JSON at orjson's speed with exactly the standard library's verdicts, values and messages.

`orjson` parses a typical batch line several times faster than `json`. It refuses a few inputs
`json` takes (lone surrogate escapes, invalid or UTF-16/32 text, a byte order mark, NaN and
Infinity, numbers beyond a double, nesting past 1,024) and, for those and for text that is not
JSON at all, `loads` asks `json` again: what is accepted and the message of a refusal are
`json`'s own. One input it reads differently: an integer beyond 64 bits, which orjson makes a
float; a text with 20 digits in a row (where such an integer must be) goes to `json` as well.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

# The shortest integer literal beyond 64 bits has 20 digits: a text with 20 digits in a row (found
# by mapping every digit to "0" and everything else to "x", a C loop: a regex costs 30x more).
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x78 for b in range(256))
_TEXT_DIGITS = str.maketrans("123456789", "000000000")  # text: other characters are never "0"
_LONG_NUMBER = b"0" * 20


def loads(data: bytes | str, slow: Callable[[Any], Any] = json.loads) -> Any:
    """`slow(data)` (by default `json.loads`), fast: orjson's value when orjson takes `data` and
    reads it as `json` does, else whatever `slow` returns or raises."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return slow(data)
    long_number = (_LONG_NUMBER in data.translate(_DIGITS) if isinstance(data, bytes)
                   else "0" * 20 in data.translate(_TEXT_DIGITS))
    return slow(data) if long_number else value


def dumps(value: Any) -> str:
    """Compact JSON text, exactly as `json.dumps(value, separators=(",", ":"))` writes it (non-ASCII
    escaped): the form request bodies are stored in."""
    return json.dumps(value, separators=(",", ":"))
