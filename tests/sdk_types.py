"""Check JSON against an official SDK's typed request parameters (TypedDicts, Literals, unions).

Stainless SDKs (`anthropic`, `openai`, `groq`) and Speakeasy's `mistralai` describe what a request
may contain as TypedDicts. pydantic's own validation of those is lenient (unknown keys ignored,
`Iterable` fields validated lazily), so this walks the types itself, strictly:

    problems = type_errors(body, anthropic.types.messages.batch_create_params.BatchCreateParams)

- a TypedDict: an object with its required keys and no key it does not declare;
- `Literal`: one of its values; unions (`Optional`, `Nullable`): any branch; `Iterable`/`Sequence`/
  `List`/`SequenceNotStr`: a JSON array, each item checked; `Dict`/`Mapping`: each value checked;
- `str`/`int`/`float`/`bool`/`None`, a `str` subclass (Speakeasy's open enums: any string), and
  pydantic models (`model_validate`, for the SDKs' response types that params also accept).
"""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Any

import pydantic
import typing_extensions

_WRAPPERS = {typing.Required, typing.NotRequired, typing_extensions.Required, typing_extensions.NotRequired,
             getattr(typing_extensions, "ReadOnly", None)}


def _is_typeddict(tp: Any) -> bool:
    return typing_extensions.is_typeddict(tp) or typing.is_typeddict(tp)


def _hints(tp: Any) -> dict[str, Any]:
    return typing.get_type_hints(tp, include_extras=True)


def _required(tp: Any, hints: dict[str, Any]) -> list[str]:
    """Required keys, from the `Required`/`NotRequired` wrappers and the class's totality
    (`__required_keys__` is wrong on Python 3.11 for some SDKs' postponed annotations)."""
    out = []
    for key, hint in hints.items():
        origin = typing.get_origin(hint)
        if origin in (typing.NotRequired, typing_extensions.NotRequired):
            continue
        if origin in (typing.Required, typing_extensions.Required) or getattr(tp, "__total__", True):
            out.append(key)
    return out


def type_errors(value: Any, tp: Any, path: str = "") -> list[str]:
    """Every way `value` (parsed JSON) is not an instance of the SDK type `tp`, as `path: problem`."""
    where = path or "<root>"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return []
    if origin is typing.Annotated or origin in _WRAPPERS:
        return type_errors(value, args[0], path)
    if hasattr(origin, "__value__") and args:  # a generic TypeAliasType: Nullable[List[str]]
        return type_errors(value, origin.__value__[args], path)
    if hasattr(tp, "__value__") and not args:  # a plain TypeAliasType
        return type_errors(value, tp.__value__, path)
    if origin in (typing.Union, types.UnionType):
        branches = [type_errors(value, arg, path) for arg in args]
        if any(not b for b in branches):
            return []
        best = min(branches, key=len)
        return best if len(best) <= 3 else [f"{where}: {value!r:.80} matches none of {tp}"]
    if origin is typing.Literal:
        return [] if value in args else [f"{where}: {value!r:.80} is not one of {list(args)}"]
    if tp is type(None):
        return [] if value is None else [f"{where}: expected null, got {type(value).__name__}"]
    if _is_typeddict(tp):
        if not isinstance(value, dict):
            return [f"{where}: expected an object ({tp.__name__}), got {type(value).__name__}"]
        hints = _hints(tp)
        out = [f"{where}: unknown field {k!r} (not in {tp.__name__})" for k in value if k not in hints]
        out += [f"{where}: required field {k!r} missing ({tp.__name__})" for k in _required(tp, hints)
                if k not in value]
        for key, sub in value.items():
            if key in hints:
                out += type_errors(sub, hints[key], f"{path}.{key}" if path else key)
        return out
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        try:
            tp.model_validate(value)
        except pydantic.ValidationError as e:
            return [f"{where}: not a {tp.__name__}: {e.errors()[0]['msg']}"]
        return []
    if origin is not None and isinstance(origin, type):
        if issubclass(origin, collections.abc.Mapping) or origin is dict:
            if not isinstance(value, dict):
                return [f"{where}: expected an object, got {type(value).__name__}"]
            item = args[1] if len(args) == 2 else Any
            return [e for k, v in value.items() for e in type_errors(v, item, f"{path}.{k}")]
        if issubclass(origin, collections.abc.Iterable) or getattr(origin, "_is_protocol", False):
            if not isinstance(value, list):
                return [f"{where}: expected an array, got {type(value).__name__}"]
            item = args[0] if args else Any
            return [e for i, v in enumerate(value) for e in type_errors(v, item, f"{path}[{i}]")]
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is bool:
        ok = isinstance(value, bool)
    elif isinstance(tp, type) and issubclass(tp, str):
        ok = isinstance(value, str)
    elif tp in (dict, list):
        ok = isinstance(value, tp)
    else:
        return [f"{where}: cannot check type {tp!r}"]
    return [] if ok else [f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r:.60}"]
