"""JSON decoding at the speed of orjson, with exactly the standard library's verdicts and values.

`orjson` parses a typical batch line about five times faster than `json`. It refuses a few inputs
`json` accepts (NaN and Infinity, integers beyond 64 bits, lone surrogates, UTF-16/32 text, a
UTF-8 byte order mark); for those, and for text that is not JSON at all, `loads` asks `json` again,
so what is accepted, what it decodes to, and the error message of a refused line are `json`'s own.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes | str) -> Any:
    """`json.loads`, fast: raises what `json.loads` raises, for the same inputs."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(value: Any) -> str:
    """Compact JSON text, fast. Like `json.dumps(value, separators=(",", ":"))` but with non-ASCII
    characters written as UTF-8, not `\\u` escapes (the same JSON value). Values orjson cannot write
    (an integer beyond 64 bits, a non-string key) are written by `json`; NaN and Infinity, which are
    not JSON, become null."""
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, separators=(",", ":"))
