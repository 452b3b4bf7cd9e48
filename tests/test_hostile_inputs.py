"""Every bad input is a clean 4xx in OpenAI's envelope, never a 5xx, on SQLite and PostgreSQL
alike: inputs of each class are GENERATED (Hypothesis) and sent through the real stack (Envoy +
server), REST and native gRPC.

Classes: bytes that are not UTF-8 text (or hold NUL) in path segments and query values; ids of
any length and shape; request headers of any size; unknown, repeated and mistyped create
parameters; request lines with NUL or lone surrogates, over-long models, deep nesting, NaN and
Infinity; undecodable protobuf from non-Python gRPC clients. A failed upload leaves nothing in
the database.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sluice.v1 import batch_pb2
from tests.e2e import KEY_A, Stack
from tests.hostile import (
    assert_clean,
    backend_stack_fixture,  # noqa: F401  (the fixture `backend_stack`)
    hidden_leftovers,
    jsonl_line,
    multipart,
)

EXAMPLES = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CHAT = "/v1/chat/completions"
KNOWN_CREATE = ("input_file_id", "endpoint", "completion_window", "metadata", "requests")

# Any code point, lone surrogates included (Hypothesis leaves them out by default).
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | any_text
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(any_text, c, max_size=4),
                           max_leaves=20)


def pct(raw: bytes) -> str:
    return "".join(f"%{b:02X}" for b in raw)


def segment(value: str | bytes) -> str:
    """`value` as one percent-encoded path segment (every byte escaped, so no '/' or '.' survive)."""
    return pct(value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass"))


@pytest.fixture(scope="module")
def http(backend_stack: Stack) -> httpx.Client:
    return backend_stack.http()


@pytest.fixture(scope="module")
def a_batch(backend_stack: Stack, http: httpx.Client) -> str:
    r = http.post("/v1/batches", json={"endpoint": CHAT, "requests": [json.loads(jsonl_line("one"))]})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


# --------------------------------------------------------------------------- paths and queries


@EXAMPLES
@given(st.binary(min_size=1, max_size=60) | st.text(st.characters(exclude_categories=()), min_size=1, max_size=60))
@example(b"\xff")
@example(b"a\x00b")
@example(b"\xed\xa0\x80")  # a UTF-8-encoded surrogate
@example("x" * 5000)
@example("results")
def test_any_path_segment_is_a_clean_answer(http: httpx.Client, a_batch: str, value: str | bytes) -> None:
    seg = segment(value)
    for method, path in [("GET", f"/v1/batches/{seg}"), ("POST", f"/v1/batches/{seg}/cancel"),
                         ("GET", f"/v1/batches/{seg}/results"), ("GET", f"/v1/batches/{a_batch}/{seg}"),
                         ("GET", f"/v1/batches/{a_batch}/results/{seg}"), ("POST", f"/v1/batches/{seg}/retry"),
                         ("GET", f"/v1/batches/{a_batch}/{seg}/attempts"), ("GET", f"/v1/files/{seg}"),
                         ("GET", f"/v1/files/{seg}/content"), ("DELETE", f"/v1/files/{seg}")]:
        r = http.request(method, path)
        error = assert_clean(r, 200, 400, 404)
        if error is not None and r.status_code == 400:
            assert error["code"] == "invalid_encoding" and error["param"] in ("id", "custom_id"), error


@EXAMPLES
@given(st.sampled_from(["after", "limit", "order", "purpose"]), st.binary(max_size=40) | any_text)
@example("after", b"\xff")
@example("after", "garbage")
@example("limit", "99999999999")
def test_any_query_value_is_a_clean_answer(http: httpx.Client, a_batch: str, name: str, value: str | bytes) -> None:
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    for path in ("/v1/batches", "/v1/files", f"/v1/batches/{a_batch}/results"):
        r = http.get(f"{path}?{name}={pct(raw)}")
        error = assert_clean(r, 200, 400, 404)
        if error is not None and error["code"] not in ("unknown_parameter", "invalid_encoding"):
            assert error["param"] == name, error  # the parameter at fault, by its REST name


def test_files_after_names_after(http: httpx.Client) -> None:
    error = assert_clean(http.get("/v1/files", params={"after": "garbage"}), 404)
    assert error is not None and (error["param"], error["code"]) == ("after", "cursor_not_found")


@EXAMPLES
@given(st.integers(0, 100 * 1024), st.integers(1, 50))
@example(20 * 1024, 1)
@example(70 * 1024, 1)
@example(10, 120)
def test_big_headers_are_431_never_a_retryable_429(http: httpx.Client, size: int, count: int) -> None:
    headers = {f"x-h{i}": "a" * (size // count) for i in range(count)}
    error = assert_clean(http.get("/v1/batches", headers=headers), 200, 431)
    if error is not None:
        assert error["code"] == "headers_too_large"


# --------------------------------------------------------------------------- create parameters


@EXAMPLES
@given(st.dictionaries(st.sampled_from(KNOWN_CREATE) | any_text, json_values, max_size=6))
@example({"input_file_id": "file-x", "endpoint": CHAT, "completion_windw": "24h"})
@example({"endpoint": CHAT, "requests": {"custom_id": "a"}})
@example({"input_file_id": 5})
def test_create_parameters_are_checked_by_name_and_type(http: httpx.Client, body: dict[str, Any]) -> None:
    r = http.post("/v1/batches", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    error = assert_clean(r, 200, 400, 404, 413)
    unknown = [k for k in body if k not in KNOWN_CREATE]
    if unknown:
        assert error is not None
    if "requests" in body and not isinstance(body["requests"], list):
        assert error is not None


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_a_create_body_that_is_not_declared_json_is_400(http: httpx.Client, content_type: str) -> None:
    body = json.dumps({"input_file_id": "file-x", "endpoint": CHAT, "completion_window": "24h"}).encode()
    r = http.post("/v1/batches", content=body, headers={"content-type": content_type})
    error = assert_clean(r, 400)
    assert error is not None and error["code"] == "invalid_content_type"


@pytest.mark.parametrize(("path", "body", "code", "param"), [
    ("/v1/batches/estimate", {"endpoint": CHAT, "completion_windw": "24h"}, "unknown_parameter", "completion_windw"),
    ("/v1/batches/estimate", {"endpoint": CHAT, "requests": {"custom_id": "a"}}, "invalid_type", "requests"),
    ("/v1/batches/{batch}/retry", {"custom_id": ["one"]}, "unknown_parameter", "custom_id"),
    ("/v1/batches/{batch}/retry", {"outcomes": "failed"}, "invalid_type", "outcomes"),
    ("/v1/batches/{batch}/retry", {"model": ["sim/x"]}, "invalid_type", "model"),
])
def test_estimate_and_retry_parameters_are_checked_by_name_and_type(http: httpx.Client, a_batch: str, path: str,
                                                                     body: dict[str, Any], code: str,
                                                                     param: str) -> None:
    """Like create's: a misspelt key is refused, never silently dropped (a retry of `custom_id`
    would otherwise retry every failed line instead of the one named)."""
    target = path.format(batch=a_batch)
    error = assert_clean(http.post(target, json=body), 400)
    assert error is not None and (error["code"], error["param"]) == (code, param), error
    r = http.post(target, content=json.dumps(body).encode(), headers={"content-type": "text/plain"})
    error = assert_clean(r, 400)
    assert error is not None and error["code"] == "invalid_content_type"


# --------------------------------------------------------------------------- request lines


def _verdict(r: httpx.Response) -> bool:
    error = assert_clean(r, 200, 400, 413)
    return error is None


@EXAMPLES
@given(custom_id=st.text(st.characters(exclude_categories=()), min_size=1, max_size=30),
       model=st.text(st.characters(exclude_categories=()), min_size=1, max_size=300),
       extra=json_values)
@example(custom_id="a\x00b", model="sim/x", extra=None)
@example(custom_id="\ud800", model="sim/x", extra=None)
@example(custom_id="ok", model="sim/" + "m" * 300, extra=None)
def test_a_line_gets_the_same_verdict_inline_and_as_a_file(backend_stack: Stack, http: httpx.Client, custom_id: str,
                                                         model: str, extra: Any) -> None:
    """Inline and uploaded lines go through the same rules on every backend: a line one path (or
    one database) refuses, the other refuses too, and a refused upload stores nothing."""
    model = "sim/" + model  # routable, so only the rules under test decide
    raw = jsonl_line(custom_id, model, extra=extra)
    inline = http.post("/v1/batches", content=b'{"endpoint":"%s","requests":[%s]}' % (CHAT.encode(), raw),
                       headers={"content-type": "application/json"})
    content, ct = multipart([("purpose", None, b"batch"), ("file", "x.jsonl", raw + b"\n")])
    uploaded = http.post("/v1/files", content=content, headers={"content-type": ct})
    assert _verdict(inline) == _verdict(uploaded), (inline.text[:300], uploaded.text[:300])
    if uploaded.status_code == 200:
        got = http.get(f"/v1/files/{uploaded.json()['id']}/content")
        assert got.content == raw + b"\n"
    else:
        assert hidden_leftovers(backend_stack.database_url) == (0, 0)


@EXAMPLES
@given(st.one_of(
    st.integers(1, 120).map(lambda d: jsonl_line(x=json.loads("[" * d + "]" * d))),
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999"]).map(
        lambda c: jsonl_line().replace(b'"hi"', b'"hi","n":' + c, 1).replace(b'"hi","n":', b'"hi"},{"n":', 1)),
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
))
def test_any_file_line_is_a_clean_answer_and_a_refusal_stores_nothing(backend_stack: Stack, http: httpx.Client,
                                                                      line: bytes) -> None:
    content, ct = multipart([("purpose", None, b"batch"), ("file", "x.jsonl", line + b"\n")])
    r = http.post("/v1/files", content=content, headers={"content-type": ct})
    assert_clean(r, 200, 400, 413)
    if r.status_code != 200:
        assert hidden_leftovers(backend_stack.database_url) == (0, 0)


# --------------------------------------------------------------------------- native gRPC


def _raw_call(stack: Stack, method: str, payload: bytes) -> grpc.RpcError:
    """Send raw protobuf bytes (as a Go or C++ client could: no UTF-8 check on its side)."""
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        call = channel.unary_unary(f"/sluice.v1.BatchService/{method}", request_serializer=None,
                                   response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(payload, metadata=(("authorization", f"Bearer {KEY_A}"),), timeout=10)
    return info.value


@EXAMPLES
@given(st.binary(min_size=1, max_size=40))
@example(b"\xff")
@example(b"\xed\xa0\x80")
def test_undecodable_grpc_requests_are_invalid_argument(backend_stack: Stack, raw: bytes) -> None:
    payload = b"\x0a" + bytes([len(raw)]) + raw  # GetBatchRequest.id = raw bytes
    err: Any = _raw_call(backend_stack, "GetBatch", payload)
    try:
        raw.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    assert err.code() == (grpc.StatusCode.NOT_FOUND if valid else grpc.StatusCode.INVALID_ARGUMENT), err.details()
    for leak in ("sluice.v1", "DecodeError", "<class"):
        assert leak not in (err.details() or "")


def test_a_5000_character_id_is_a_clean_404_over_grpc(backend_stack: Stack) -> None:
    """Not RESOURCE_EXHAUSTED: the id is clipped in the message, so the trailers stay small."""
    with grpc.insecure_channel(f"127.0.0.1:{backend_stack.grpc_port}") as channel:
        call = channel.unary_unary("/sluice.v1.BatchService/GetBatch",
                                   request_serializer=batch_pb2.GetBatchRequest.SerializeToString,
                                   response_deserializer=batch_pb2.Batch.FromString)
        for value in ("x" * 5000, "é" * 5000, "a\x00" * 100):
            with pytest.raises(grpc.RpcError) as info:
                call(batch_pb2.GetBatchRequest(id=value), metadata=(("authorization", f"Bearer {KEY_A}"),),
                     timeout=10)
            err: Any = info.value
            assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
            assert len(err.details()) < 200


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_deep_protobuf_struct_is_invalid_argument(backend_stack: Stack) -> None:
    """A body nested deeper than protobuf's decoder allows (hand-encoded: Python's protobuf will
    not even build it): a clear INVALID_ARGUMENT, not UNKNOWN with a class name."""
    value = _field(3, b"x")  # Value.string_value
    for _ in range(60):  # Value.struct_value = Struct{fields: {"k": value}}
        value = _field(5, _field(1, _field(1, b"k") + _field(2, value)))
    body = _field(1, _field(1, b"model") + _field(2, _field(3, b"sim/x"))) + \
        _field(1, _field(1, b"deep") + _field(2, value))
    line = _field(1, b"a") + _field(2, b"POST") + _field(3, CHAT.encode()) + _field(4, body)
    err: Any = _raw_call(backend_stack, "CreateBatch", _field(2, CHAT.encode()) + _field(5, line))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "nests too deeply" in err.details()


def test_a_cursor_with_a_space_round_trips_through_a_plus(http: httpx.Client) -> None:
    """httpx (the openai SDK) sends a space in a query value as '+': it must mean a space."""
    lines = [json.loads(jsonl_line(cid)) for cid in ("a b", "c+d", "e")]
    created = http.post("/v1/batches", json={"endpoint": CHAT, "requests": lines}).json()
    batch = created["id"]
    deadline = time.monotonic() + 60
    while http.get(f"/v1/batches/{batch}").json()["status"] != "completed":
        assert time.monotonic() < deadline, "batch did not complete"
        time.sleep(0.05)
    page = http.get(f"/v1/batches/{batch}/results", params={"after": "a b", "limit": 5})
    assert "+" in str(page.request.url) and page.status_code == 200, page.text
    assert [r["custom_id"] for r in page.json()["data"]] == ["c+d", "e"]
    page = http.get(f"/v1/batches/{batch}/results", params={"after": "c+d"})
    assert [r["custom_id"] for r in page.json()["data"]] == ["e"]
    one = http.get(f"/v1/batches/{batch}/results/{quote('c+d', safe='')}")
    assert one.status_code == 200 and one.json()["custom_id"] == "c+d"


TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@EXAMPLES
@given(st.dictionaries(st.text(TOKEN_CHARS, min_size=1, max_size=20),
                       st.binary(max_size=40).map(lambda b: bytes(c for c in b if c > 0x20 and c != 0x7F)),
                       max_size=6))
@example({"COM1": b'$QbGcaO"dI', "IA!Z_H0uAd": b"INF", "x-bin": b"not base64", "grpc-timeout": b"soon"})
@example({"x-obs-text": b"caf\xe9"})
def test_any_extra_header_is_harmless(http: httpx.Client, headers: dict[str, bytes]) -> None:
    """Headers gRPC cannot carry as metadata never make the call fail (they mean nothing here)."""
    headers = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "content-length", "host",
                                                                        "transfer-encoding", "connection", "expect",
                                                                        "content-type", "te", "upgrade")}
    assert_clean(http.get("/v1/batches", headers=headers), 200)


def test_the_same_checks_hold_over_http2(backend_stack: Stack) -> None:
    """HTTP/2 (prior knowledge) sends bodies without a content-length: still checked."""
    with httpx.Client(base_url=backend_stack.url, http1=False, http2=True, timeout=60,
                      headers={"authorization": f"Bearer {KEY_A}"}) as h2:
        r = h2.post("/v1/batches", json={"input_file_id": "file-x", "endpoint": CHAT, "completion_windw": "24h"})
        assert r.http_version == "HTTP/2"
        error = assert_clean(r, 400)
        assert error is not None and (error["code"], error["param"]) == ("unknown_parameter", "completion_windw")
        r = h2.post("/v1/batches", content=b'{"input_file_id": "file-x"}', headers={"content-type": "text/plain"})
        error = assert_clean(r, 400)
        assert error is not None and error["code"] == "invalid_content_type"
        assert_clean(h2.post(f"/v1/batches/{'b' * 10}/cancel"), 404)  # no body at all: fine
