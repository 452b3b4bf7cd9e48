"""service/edge/multipart.py: incremental multipart/form-data parsing."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator, Iterable

import httpx
import httpx2
import openai
import pytest

from service.edge.multipart import MultipartError, Part, parse_boundary, parse_multipart

BOUNDARY = "e8bddd9780dff8a87216f0043cab6a91"
CT = f"multipart/form-data; boundary={BOUNDARY}"
# The exact bytes openai 3.54.0 sends for files.create(file=("in.jsonl", ...), purpose="batch").
SDK_BODY = (
    b"--e8bddd9780dff8a87216f0043cab6a91\r\n"
    b'Content-Disposition: form-data; name="purpose"\r\n\r\n'
    b"batch\r\n"
    b"--e8bddd9780dff8a87216f0043cab6a91\r\n"
    b'Content-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
    b'{"custom_id":"a"}\n{"custom_id":"b"}\n'
    b"\r\n--e8bddd9780dff8a87216f0043cab6a91--\r\n"
)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def _pieces(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    for p in pieces:
        yield p


async def _collect(source: AsyncIterator[bytes], ct: str = CT) -> list[tuple[str, str | None, str | None, bytes]]:
    out = []
    async for part in parse_multipart(source, ct):
        out.append((part.name, part.filename, part.content_type, await part.read()))
    return out


EXPECTED = [
    ("purpose", None, None, b"batch"),
    ("file", "in.jsonl", "application/octet-stream", b'{"custom_id":"a"}\n{"custom_id":"b"}\n'),
]


async def test_sdk_body_whole() -> None:
    assert await _collect(_pieces([SDK_BODY])) == EXPECTED


async def test_split_at_every_offset() -> None:
    for cut in range(len(SDK_BODY) + 1):
        got = await _collect(_pieces([SDK_BODY[:cut], SDK_BODY[cut:]]))
        assert got == EXPECTED, cut


async def test_split_at_every_pair_of_offsets_around_boundaries() -> None:
    # Three pieces, the cuts anywhere inside the last boundary line and its neighbourhood.
    start = SDK_BODY.rindex(b"\r\n--") - 4
    for a in range(start, len(SDK_BODY)):
        for b in range(a, len(SDK_BODY) + 1):
            got = await _collect(_pieces([SDK_BODY[:a], SDK_BODY[a:b], SDK_BODY[b:]]))
            assert got == EXPECTED, (a, b)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 38, 39, 40, 41, 64, 1000])
async def test_small_chunks(size: int) -> None:
    assert await _collect(_chunks(SDK_BODY, size)) == EXPECTED


async def test_the_sdk_and_httpx_bytes_live() -> None:
    """Whatever the installed SDK and httpx send for files.create parses back exactly."""
    seen: dict[str, bytes | str] = {}
    content = b'{"custom_id":"x","body":{"q":"\\r\\n--not a boundary"}}\n' * 100

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen["ct"] = request.headers["content-type"]
        seen["body"] = request.read()
        return httpx2.Response(
            200,
            json={"id": "file-1", "object": "file", "bytes": len(content), "created_at": 1,
                  "filename": "x.jsonl", "purpose": "batch", "status": "processed"},
        )

    client = openai.OpenAI(
        base_url="http://sluice.test/v1", api_key="k",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    client.files.create(file=('we"ird name.jsonl', io.BytesIO(content)), purpose="batch")
    got = await _collect(_chunks(bytes(seen["body"]), 97), str(seen["ct"]))
    assert got == [
        ("purpose", None, None, b"batch"),
        ("file", 'we"ird name.jsonl', "application/octet-stream", content),
    ]

    # And plain httpx (what curl-like clients and the tests use).
    req = httpx.Request("POST", "http://x/v1/files", data={"purpose": "batch"},
                        files={"file": ("a.jsonl", content, "application/jsonl")})
    body = req.read()
    got = await _collect(_chunks(body, 1 << 20), req.headers["content-type"])
    assert got == [("purpose", None, None, b"batch"), ("file", "a.jsonl", "application/jsonl", content)]


async def test_large_part_streams_with_bounded_buffer() -> None:
    chunk = 1 << 20
    size = 200 * chunk + 12345
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n"
            ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    block = (b'{"custom_id":"r","body":{}}\r\n' * 40000)[:chunk]
    expected = hashlib.sha256()
    largest = 0

    async def source() -> AsyncIterator[bytes]:
        # Like Envoy: pieces of at most 1 MiB, cut anywhere (not on part edges).
        data = bytearray(head)
        sent = 0
        while sent < size:
            n = min(chunk, size - sent)
            data += block[:n]
            expected.update(block[:n])
            sent += n
            while len(data) >= chunk:
                yield bytes(data[:chunk])
                del data[:chunk]
        data += tail
        yield bytes(data)

    got = hashlib.sha256()
    total = 0
    parser_bufs: list[int] = []
    async for part in parse_multipart(source(), CT):
        assert part.filename == "big.jsonl"
        async for piece in part:
            largest = max(largest, len(piece))
            total += len(piece)
            got.update(piece)
            parser_bufs.append(len(part._parser._buf))
    assert total == size
    assert got.digest() == expected.digest()
    # Never more than one input chunk plus the delimiter is held.
    assert largest <= chunk + len(BOUNDARY) + 4
    assert max(parser_bufs) <= chunk + len(BOUNDARY) + 4


async def test_skipped_parts_are_drained_and_order_enforced() -> None:
    parts: list[Part] = []
    async for part in parse_multipart(_chunks(SDK_BODY, 5), CT):
        parts.append(part)  # never read: the parser drains it when moving on
    assert [p.name for p in parts] == ["purpose", "file"]
    with pytest.raises(MultipartError, match="before moving"):
        await parts[0].read()


async def test_read_limit() -> None:
    async for part in parse_multipart(_pieces([SDK_BODY]), CT):
        if part.name == "file":
            with pytest.raises(MultipartError, match="longer than 4 bytes"):
                await part.read(limit=4)


async def test_preamble_epilogue_padding_empty_part_and_quoted_boundary() -> None:
    body = (
        b"preamble to ignore\r\n"
        b"--b0und \t\r\n"
        b'Content-Disposition: form-data; name="empty"\r\n\r\n'
        b"\r\n--b0und\r\n"
        b'content-disposition: form-data; name="f"; filename="x;y.txt"\r\n'
        b"Content-Type: text/plain\r\n"
        b"X-Long: a\r\n b\r\n\r\n"
        b"line\r\n--b0un is not it\r\n"
        b"\r\n--b0und--\r\nepilogue"
    )
    got = []
    async for part in parse_multipart(_chunks(body, 3), 'multipart/form-data; boundary="b0und"'):
        got.append((part.name, part.filename, part.headers.get("x-long"), await part.read()))
    assert got == [
        ("empty", None, None, b""),
        ("f", "x;y.txt", "a b", b"line\r\n--b0un is not it\r\n"),
    ]


def test_parse_boundary() -> None:
    assert parse_boundary(CT) == BOUNDARY.encode()
    assert parse_boundary('Multipart/Form-Data; charset=utf-8; BOUNDARY="a b;c"') == b"a b;c"
    with pytest.raises(MultipartError, match="no boundary"):
        parse_boundary("multipart/form-data")
    with pytest.raises(MultipartError, match="no boundary"):
        parse_boundary("multipart/form-data; boundary=")
    with pytest.raises(MultipartError, match="expected a multipart/form-data"):
        parse_boundary("application/json")
    with pytest.raises(MultipartError, match="longer than 70"):
        parse_boundary("multipart/form-data; boundary=" + "a" * 71)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "no '--e8bd"),
        (b"just some bytes without any boundary", "no '--e8bd"),
        (SDK_BODY[: SDK_BODY.index(b"batch")], "part ends without a boundary"),
        (SDK_BODY[: SDK_BODY.index(b"batch") - 10], "ends inside a boundary or headers"),
        (SDK_BODY[: -len(b"--\r\n")], "ends right after a boundary"),
        (SDK_BODY[:-60], "part ends without a boundary"),
        (f"--{BOUNDARY}\r\nno colon here\r\n\r\nx\r\n--{BOUNDARY}--".encode(), "malformed part header line"),
        (f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--".encode(), "no Content-Disposition"),
        (f"--{BOUNDARY}\r\nContent-Disposition: attachment\r\n\r\nx\r\n--{BOUNDARY}--".encode(),
         "not form-data with a name"),
        (f"--{BOUNDARY}junk\r\n\r\nx\r\n--{BOUNDARY}--".encode(), "unexpected bytes after a boundary"),
        (f"--{BOUNDARY}\r\nX: {'y' * 20000}\r\n\r\n".encode(), "too long|longer than"),
    ],
)
async def test_errors(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        await _collect(_chunks(body, 7))
