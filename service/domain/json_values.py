"""JSON values that went through `google.protobuf.Struct`, made plain again.

`Struct` holds every number as a double, so `{"max_tokens": 100}` comes back as 100.0; providers
with strict schemas reject that, and people reading output do not expect it. `plain_json` turns
integral doubles back into integers (within the range a double holds exactly).
"""

from __future__ import annotations

from typing import Any

MAX_SAFE_INT = 2**53


def plain_json(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < MAX_SAFE_INT:
        return int(value)
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_json(v) for v in value]
    return value
