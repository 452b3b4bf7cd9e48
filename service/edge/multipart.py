"""Incremental `multipart/form-data` parsing (RFC 7578 / RFC 2046) for streamed uploads.

Envoy's transcoder hands UploadFile the raw request body in pieces of at most 1 MiB; this turns
them into form parts without ever holding a whole part: a part's body is itself an async
iterator of byte chunks, and the parser buffers at most one input chunk plus the delimiter.

    async for part in parse_multipart(chunks, content_type):
        if part.name == "purpose":
            purpose = (await part.read(limit=64)).decode()
        elif part.name == "file":
            async for data in part:          # stream to storage
                ...

Parts must be consumed in order: asking for the next part first drains (discards) what is
left of the current one. Iterating a part twice, or after moving on, raises `MultipartError`.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field

__all__ = ["MultipartError", "Part", "parse_boundary", "parse_multipart"]

MAX_HEADER_BYTES = 16 * 1024
MAX_PARTS = 64
_CRLF = b"\r\n"


class MultipartError(ValueError):
    """The body or its Content-Type is not valid multipart/form-data."""


def _split_params(value: str) -> tuple[str, dict[str, str]]:
    """`type; a=1; b="x;y"` -> ("type", {"a": "1", "b": "x;y"}); names lower-cased."""
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif quoted and ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == '"':
            current.append(ch)
            quoted = not quoted
        elif ch == ";" and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    head = items[0].strip().lower()
    params: dict[str, str] = {}
    for item in items[1:]:
        key, sep, raw = item.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        params[key] = raw
    return head, params


def parse_boundary(content_type: str) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type, or `MultipartError`."""
    media, params = _split_params(content_type or "")
    if media != "multipart/form-data":
        raise MultipartError(f"expected a multipart/form-data body, got Content-Type {content_type!r}")
    boundary = params.get("boundary", "")
    if not boundary:
        raise MultipartError("the multipart/form-data Content-Type has no boundary parameter")
    if len(boundary) > 70:
        raise MultipartError("the multipart boundary is longer than 70 characters")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise MultipartError("the multipart boundary is not ASCII") from None


@dataclass
class Part:
    """One form part: its headers, and its body as an async iterator of byte chunks."""

    name: str
    filename: str | None
    content_type: str | None
    headers: dict[str, str] = field(repr=False)
    _parser: _Parser = field(repr=False)
    _index: int = field(repr=False)
    _started: bool = field(default=False, repr=False)

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._started:
            raise MultipartError(f"the body of part {self.name!r} was already read")
        self._started = True
        return self._parser.body_chunks(self._index)

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; `MultipartError` if it is longer than `limit` bytes (for small fields)."""
        out = bytearray()
        async for chunk in self:
            out += chunk
            if limit is not None and len(out) > limit:
                raise MultipartError(f"form field {self.name!r} is longer than {limit} bytes")
        return bytes(out)


class _Parser:
    def __init__(self, chunks: AsyncIterable[bytes], boundary: bytes) -> None:
        self._source = aiter(chunks)
        self._delimiter = b"\r\n--" + boundary
        # A CRLF is virtually prepended so the first boundary looks like every other one
        # (RFC 2046: the CRLF before a delimiter belongs to the delimiter).
        self._buf = bytearray(_CRLF)
        self._eof = False
        self._part_index = -1
        self._in_body = False

    async def _fill(self) -> bool:
        """Append the next non-empty source chunk; False at the end of the source."""
        if self._eof:
            return False
        async for chunk in self._source:
            if chunk:
                self._buf += chunk
                return True
        self._eof = True
        return False

    async def _skip_to_delimiter(self, what: str) -> None:
        """Discard bytes (preamble or an unread body) through the next delimiter."""
        delim = self._delimiter
        while True:
            i = self._buf.find(delim)
            if i >= 0:
                del self._buf[: i + len(delim)]
                return
            keep = len(delim) - 1
            if len(self._buf) > keep:
                del self._buf[: len(self._buf) - keep]
            if not await self._fill():
                raise MultipartError(f"truncated multipart body: {what}")

    async def _read_line(self, limit: int) -> bytes:
        while True:
            i = self._buf.find(_CRLF)
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 2]
                return line
            if len(self._buf) > limit:
                raise MultipartError("malformed multipart body: line after a boundary is too long")
            if not await self._fill():
                raise MultipartError("truncated multipart body: it ends inside a boundary or headers")

    async def next_part(self) -> Part | None:
        if self._part_index < 0:
            await self._skip_to_delimiter(f"no '--{self._delimiter[4:].decode()}' line found")
        elif self._in_body:
            await self._skip_to_delimiter("a part ends without a boundary")
            self._in_body = False
        # After a delimiter: `--` closes the body; otherwise optional whitespace, then CRLF.
        while len(self._buf) < 2:
            if not await self._fill():
                raise MultipartError("truncated multipart body: it ends right after a boundary")
        if self._buf[:2] == b"--":
            return None
        rest = await self._read_line(MAX_HEADER_BYTES)
        if rest.strip(b" \t"):
            raise MultipartError("malformed multipart body: unexpected bytes after a boundary")
        headers = await self._read_headers()
        self._part_index += 1
        if self._part_index >= MAX_PARTS:
            raise MultipartError(f"too many parts in the multipart body (at most {MAX_PARTS})")
        disposition = headers.get("content-disposition")
        if disposition is None:
            raise MultipartError(
                f"malformed part headers: part {self._part_index} has no Content-Disposition"
            )
        kind, params = _split_params(disposition)
        if kind != "form-data" or "name" not in params:
            raise MultipartError(
                f"malformed part headers: part {self._part_index} Content-Disposition {disposition!r} "
                "is not form-data with a name"
            )
        filename = params.get("filename")
        if filename is not None:  # WHATWG form encoding (browsers, httpx) escapes only these three
            filename = filename.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")
        if "filename*" in params:  # RFC 5987, which RFC 7578 discourages but some clients send
            charset, _, encoded = params["filename*"].partition("'")
            _, _, encoded = encoded.partition("'")
            filename = urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="replace")
        self._in_body = True
        return Part(
            name=params["name"],
            filename=filename,
            content_type=headers.get("content-type"),
            headers=headers,
            _parser=self,
            _index=self._part_index,
        )

    async def _read_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        total = 0
        last: str | None = None
        while True:
            line = await self._read_line(MAX_HEADER_BYTES - total)
            total += len(line) + 2
            if total > MAX_HEADER_BYTES:
                raise MultipartError(f"malformed part headers: longer than {MAX_HEADER_BYTES} bytes")
            if not line:
                return headers
            text = line.decode("utf-8", errors="replace")
            if text[0] in " \t" and last is not None:  # obsolete line folding
                headers[last] += " " + text.strip()
                continue
            name, sep, value = text.partition(":")
            name = name.strip().lower()
            if not sep or not name or " " in name:
                raise MultipartError(f"malformed part header line {text[:100]!r}")
            headers[name] = value.strip()
            last = name

    async def body_chunks(self, index: int) -> AsyncIterator[bytes]:
        if index != self._part_index or not self._in_body:
            raise MultipartError("a part's body can only be read before moving to the next part")
        delim = self._delimiter
        keep = len(delim) - 1
        while True:
            i = self._buf.find(delim)
            if i >= 0:
                if i:
                    chunk = bytes(self._buf[:i])
                    del self._buf[:i]
                    yield chunk
                # The delimiter stays in the buffer for next_part to consume.
                self._in_body = False
                del self._buf[: len(delim)]
                return
            if len(self._buf) > keep:
                # Everything but a possible delimiter prefix at the end is body.
                cut = len(self._buf) - keep
                partial = self._buf.find(b"\r", cut)
                cut = partial if partial >= 0 else len(self._buf)
                if cut:
                    chunk = bytes(self._buf[:cut])
                    del self._buf[:cut]
                    yield chunk
            if not await self._fill():
                raise MultipartError("truncated multipart body: a part ends without a boundary")


async def parse_multipart(chunks: AsyncIterable[bytes], content_type: str) -> AsyncIterator[Part]:
    """Yield the form parts of a `multipart/form-data` body streamed as `chunks`.

    `content_type` is the request's Content-Type header (it carries the boundary). Raises
    `MultipartError` for a missing/invalid boundary, malformed part headers, or a truncated body
    (no closing `--boundary--`). Bytes before the first and after the last boundary are ignored.
    """
    parser = _Parser(chunks, parse_boundary(content_type))
    while True:
        part = await parser.next_part()
        if part is None:
            return
        yield part
