"""Google Gemini Developer API batch mode (`models/{model}:batchGenerateContent`).

The model is fixed per batch, in the URL: every line of a Sluice batch must name the same model
(the submit fails with a clear error otherwise). OpenAI chat bodies become
`GenerateContentRequest`s (`contents` with roles user/model, `systemInstruction`,
`generationConfig`, tools) and `GenerateContentResponse`s become `chat.completion` bodies.

Two input modes: below `options.inline_limit_bytes` (default 20 MB) the requests go inline
(`input_config.requests.requests[]`, each with `metadata.key` = Sluice's line id, echoed back next to
the result, which comes back in input order); above it they are uploaded as a JSONL file with
the resumable upload protocol (`{key, request}` lines; results in a `responsesFile`, joined on `key`).
The lines are spooled (memory, then disk) once, and whichever body is sent is streamed from the spool.

The batch's `display_name` is Sluice's batch id, so `find_submitted` can find a batch created
just before a crash by listing (creates are not idempotent at Google). States are accepted as
`BATCH_STATE_*` (wire) and `JOB_STATE_*` (SDK); counts are int64-as-string and omitted when 0.
`SUCCEEDED` batches can carry per-request errors (google.rpc.Status); `EXPIRED`, `FAILED` and
`CANCELLED` batches have no results (the engine gives their lines batch_expired/… errors).

Embeddings (`asyncBatchEmbedContent`) are not supported yet: such batches fail at submit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

from adapters.base import (
    BatchErrorItem,
    BatchJob,
    Capabilities,
    LineError,
    LineResult,
    NativeBatchAdapter,
    ProviderError,
    ProviderState,
    ProviderStatus,
    RequestLine,
    TokenUsage,
    parse_line_id,
    provider_line_id,
)
from adapters.chat_format import (
    CHAT_ENDPOINT,
    GRPC_HTTP,
    GRPC_NAMES,
    UnsupportedRequest,
    append_turn,
    assistant_message,
    chat_completion,
    content_parts,
    content_text,
    function_of,
    image_url_of,
    json_array_body,
    max_output_tokens,
    openai_error,
    parse_data_url,
    stop_list,
    submit_error,
    tool_arguments,
    tool_call,
)
from adapters.openai_format import as_int, iter_jsonl, spool_jsonl

log = logging.getLogger(__name__)

API_VERSION = "v1beta"
DEFAULT_INLINE_LIMIT = 20 * 1024 * 1024
DEFAULT_FIND_PAGES = 20

STATES = {
    "UNSPECIFIED": ProviderState.VALIDATING, "PENDING": ProviderState.VALIDATING, "QUEUED": ProviderState.VALIDATING,
    "RUNNING": ProviderState.IN_PROGRESS, "PAUSED": ProviderState.IN_PROGRESS, "UPDATING": ProviderState.IN_PROGRESS,
    "SUCCEEDED": ProviderState.COMPLETED, "PARTIALLY_SUCCEEDED": ProviderState.COMPLETED,
    "FAILED": ProviderState.FAILED, "CANCELLING": ProviderState.CANCELLING, "CANCELLED": ProviderState.CANCELLED,
    "EXPIRED": ProviderState.EXPIRED,
}
FINISH_REASONS = {
    "STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter", "MALFORMED_FUNCTION_CALL": "stop", "LANGUAGE": "stop", "OTHER": "stop",
}
HTTP_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 429: "rate_limit_error"}


def state_name(raw: Any) -> str:
    """`BATCH_STATE_RUNNING` / `JOB_STATE_RUNNING` → `RUNNING`."""
    text = str(raw or "UNSPECIFIED")
    for prefix in ("BATCH_STATE_", "JOB_STATE_"):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


# --- OpenAI chat -> GenerateContentRequest --------------------------------------------------------


def _parts(content: Any) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for part in content_parts(content):
        kind = part.get("type", "text")
        if kind in ("text", "input_text"):
            parts.append({"text": str(part.get("text", ""))})
        elif kind == "image_url":
            url = image_url_of(part)
            data = parse_data_url(url)
            parts.append({"inlineData": {"mimeType": data[0], "data": data[1]}} if data
                         else {"fileData": {"fileUri": url}})
        else:
            raise UnsupportedRequest(f"message content part of type {kind!r} is not supported by Gemini")
    return parts


def _function_declaration(tool: Any) -> dict[str, Any]:
    fn = function_of(tool, "Gemini")
    out: dict[str, Any] = {"name": fn.get("name")}
    if fn.get("description"):
        out["description"] = fn["description"]
    if fn.get("parameters"):
        out["parametersJsonSchema"] = fn["parameters"]
    return out


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice in ("auto", "none", "required"):
        return {"functionCallingConfig": {"mode": {"auto": "AUTO", "none": "NONE", "required": "ANY"}[choice]}}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [choice["function"].get("name")]}}
    raise UnsupportedRequest(f"tool_choice {choice!r} is not supported by Gemini")


def to_generate_content_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat.completions body as a Gemini `GenerateContentRequest` (the model is not
    part of it: it is fixed per batch)."""
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise UnsupportedRequest("messages must be a non-empty list")
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for the tool results
    for m in raw_messages:
        if not isinstance(m, dict):
            raise UnsupportedRequest("every message must be an object")
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(content_text(m.get("content")))
        elif role == "user":
            append_turn(contents, "user", _parts(m.get("content")), "parts")
        elif role == "assistant":
            parts: list[dict[str, Any]] = []
            text = content_text(m.get("content"))
            if text:
                parts.append({"text": text})
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                call_names[str(call.get("id"))] = str(fn.get("name"))
                parts.append({"functionCall": {"name": fn.get("name"), "args": tool_arguments(fn.get("arguments"))}})
            append_turn(contents, "model", parts, "parts")
        elif role == "tool":
            name = call_names.get(str(m.get("tool_call_id")))
            if name is None:
                raise UnsupportedRequest("a tool message answers no earlier assistant tool call")
            text = content_text(m.get("content"))
            try:
                response = json.loads(text)
            except ValueError:
                response = None
            append_turn(contents, "user", [{"functionResponse": {
                "name": name, "response": response if isinstance(response, dict) else {"content": text}}}], "parts")
        else:
            raise UnsupportedRequest(f"message role {role!r} is not supported by Gemini")
    request: dict[str, Any] = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    config: dict[str, Any] = {}
    max_tokens = max_output_tokens(body)
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    for src, dst in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK"), ("seed", "seed"),
                     ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty")):
        if body.get(src) is not None:
            config[dst] = body[src]
    if body.get("n") not in (None, 1):
        config["candidateCount"] = body["n"]
    stops = stop_list(body.get("stop"))
    if stops:
        config["stopSequences"] = stops
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        config["responseMimeType"] = "application/json"
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        config["responseMimeType"] = "application/json"
        schema = (fmt.get("json_schema") or {}).get("schema")
        if schema:
            config["responseJsonSchema"] = schema
    if config:
        request["generationConfig"] = config
    if body.get("tools"):
        request["tools"] = [{"functionDeclarations": [_function_declaration(t) for t in body["tools"]]}]
        tool_config = _tool_config(body.get("tool_choice"))
        if tool_config:
            request["toolConfig"] = tool_config
    return request


# --- GenerateContentResponse -> chat.completion ---------------------------------------------------


def usage_of(raw: Any) -> TokenUsage:
    """usageMetadata → OpenAI semantics (the Gemini API's `UsageMetadata` reference): thoughts are
    output tokens billed apart from the candidates, so completion = candidates + thoughts and
    reasoning = thoughts."""
    raw = raw if isinstance(raw, dict) else {}
    thoughts = as_int(raw.get("thoughtsTokenCount"))
    return TokenUsage(input_tokens=as_int(raw.get("promptTokenCount")) + as_int(raw.get("toolUsePromptTokenCount")),
                      cached_tokens=as_int(raw.get("cachedContentTokenCount")),
                      output_tokens=as_int(raw.get("candidatesTokenCount")) + thoughts, reasoning_tokens=thoughts)


def to_chat_completion(response: dict[str, Any], model: str, fallback_id: str) -> tuple[dict[str, Any], TokenUsage]:
    choices: list[dict[str, Any]] = []
    for n, candidate in enumerate(response.get("candidates") or []):
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for part in (candidate.get("content") or {}).get("parts") or []:
            if part.get("thought"):
                continue  # thought summaries are not part of the answer
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part.get("functionCall"), dict):
                fn = part["functionCall"]
                calls.append(tool_call(str(fn.get("id") or f"call_{n}_{len(calls)}"), str(fn.get("name")),
                                       fn.get("args")))
        finish = FINISH_REASONS.get(str(candidate.get("finishReason")), "stop")
        if calls and finish == "stop":
            finish = "tool_calls"
        choices.append({"message": assistant_message("".join(texts) or None, calls), "finish_reason": finish})
    if not choices:  # the prompt itself was blocked (promptFeedback.blockReason)
        choices.append({"message": assistant_message(None, []), "finish_reason": "content_filter"})
    usage = usage_of(response.get("usageMetadata"))
    body = chat_completion(str(response.get("responseId") or fallback_id),
                           str(response.get("modelVersion") or model), choices, usage)
    return body, usage


def to_line_result(index: int, item: dict[str, Any], model: str) -> LineResult:
    """One inlined response / responses-file line (`{response}` or `{error: google.rpc.Status}`)."""
    if isinstance(item.get("response"), dict):
        body, usage = to_chat_completion(item["response"], model, f"gemini-{provider_line_id(index)}")
        return LineResult(index=index, status_code=200, body=body, usage=usage, request_id=body["id"])
    error = item.get("error")
    if isinstance(error, dict):
        code = as_int(error.get("code"))
        status = code if code >= 100 else GRPC_HTTP.get(code, 500)  # gRPC code, or already an HTTP one
        kind = HTTP_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "provider_error")
        return LineResult(index=index, status_code=status,
                          body=openai_error(str(error.get("message") or "request failed"), kind,
                                            str(error.get("status") or GRPC_NAMES.get(code, code))))
    return LineResult(index=index, status_code=0, error=LineError(
        code="invalid_provider_response", message="Gemini returned neither a response nor an error."))


def operation_status(op: dict[str, Any]) -> ProviderStatus:
    meta: dict[str, Any] = op["metadata"] if isinstance(op.get("metadata"), dict) else op
    raw = str(meta.get("state") or "")
    status = STATES.get(state_name(raw))
    if status is None:
        log.warning("gemini: unknown batch state %r; treating it as in_progress", raw)
        status = ProviderState.IN_PROGRESS
    error = op.get("error")
    if op.get("done") and isinstance(error, dict) and status not in (ProviderState.CANCELLED, ProviderState.EXPIRED):
        status = ProviderState.FAILED
    stats = meta.get("batchStats") or {}
    errors: tuple[BatchErrorItem, ...] = ()
    if isinstance(error, dict):
        code = as_int(error.get("code"))
        errors = (BatchErrorItem(code=str(error.get("status") or GRPC_NAMES.get(code, "provider_error")),
                                 message=str(error.get("message") or "the batch failed")),)
    return ProviderStatus(status=status, raw_status=raw or "UNSPECIFIED", total=as_int(stats.get("requestCount")),
                          completed=as_int(stats.get("successfulRequestCount")),
                          failed=as_int(stats.get("failedRequestCount")), errors=errors)


def _output(op: dict[str, Any]) -> dict[str, Any]:
    response = op.get("response")
    if isinstance(response, dict) and (response.get("inlinedResponses") or response.get("responsesFile")):
        return response
    meta = op.get("metadata") or {}
    output = meta.get("output") if isinstance(meta, dict) else None
    return output if isinstance(output, dict) else {}


def _inline_line(raw: bytes) -> bytes:
    """A spooled `{key, request}` line as an inline request `{request, metadata: {key}}`."""
    obj = json.loads(raw)
    return json.dumps({"request": obj["request"], "metadata": {"key": obj["key"]}},
                      separators=(",", ":"), ensure_ascii=False).encode()


class GeminiAdapter(NativeBatchAdapter):
    kind = "gemini"
    # Batch embeddings are not implemented; Gemini fixes the model per batch.
    capabilities = Capabilities(endpoints=frozenset({CHAT_ENDPOINT}), one_model_per_job=True,
                                finds_lost_submissions=True)

    def __init__(self, name: str, *, base_url: str = "https://generativelanguage.googleapis.com",
                 api_key: str = "", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(name, base_url=base_url, api_key=api_key, options=options)
        options = self.options
        self.version = str(options.get("api_version", API_VERSION))
        self.inline_limit = int(options.get("inline_limit_bytes", DEFAULT_INLINE_LIMIT))
        self.find_pages = int(options.get("find_max_pages", DEFAULT_FIND_PAGES))
        self.page_size = int(options.get("list_page_size", 100))

    def headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self.api_key}

    def _model_path(self, model: str) -> str:
        return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"

    async def submit(self, job: BatchJob, lines: AsyncIterable[RequestLine]) -> str:
        def encode(line: RequestLine) -> dict[str, Any]:
            try:
                request = to_generate_content_request(line.body)
            except UnsupportedRequest as exc:
                raise submit_error(self.name, line.index, line.custom_id, str(exc)) from None
            return {"key": provider_line_id(line.index), "request": request}

        spool, count = await spool_jsonl(lines, encode)
        try:
            if not count:
                raise ProviderError(f"{self.name}: the batch has no requests", provider=self.name, retryable=False)
            spool.seek(0, 2)
            size = spool.tell()
            url = f"/{self.version}/{self._model_path(job.model)}:batchGenerateContent"
            if size <= self.inline_limit:
                head = b'{"batch":{"display_name":' + json.dumps(job.batch_id).encode() + \
                    b',"input_config":{"requests":{"requests":['

                length, chunks = json_array_body(spool, head, b"]}}}}", _inline_line)
                op = await self.http.json("POST", url, content=chunks(),
                                          headers={"content-type": "application/json", "content-length": str(length)})
            else:
                file_name = await self._upload(spool, size, job.batch_id)
                op = await self.http.json("POST", url, json={"batch": {
                    "display_name": job.batch_id, "input_config": {"file_name": file_name}}})
        finally:
            spool.close()
        return str(op["name"])

    async def _upload(self, spool: Any, size: int, display_name: str) -> str:
        """The resumable upload protocol: start a session, then send all bytes and finalize."""
        start = await self.http.request("POST", f"/upload/{self.version}/files", json={
            "file": {"display_name": f"{display_name}.jsonl"}}, headers={
            "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Length": str(size), "X-Goog-Upload-Header-Content-Type": "jsonl"})
        session = start.headers.get("x-goog-upload-url")
        if not session:
            raise ProviderError(f"{self.name}: the upload start returned no X-Goog-Upload-URL",
                                provider=self.name, retryable=True, code="bad_upload_session")

        async def chunks() -> AsyncIterator[bytes]:
            spool.seek(0)
            while chunk := spool.read(256 * 1024):
                yield chunk

        done = await self.http.json("POST", session, content=chunks(), headers={
            "X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0",
            "content-length": str(size)})
        return str((done.get("file") or {})["name"])

    async def _operation(self, provider_batch_id: str) -> dict[str, Any]:
        op: dict[str, Any] = await self.http.json("GET", f"/{self.version}/{provider_batch_id}")
        return op

    async def find_submitted(self, batch_id: str, job: BatchJob | None = None,
                             since: int | None = None) -> str | None:
        token = ""
        for _ in range(self.find_pages):
            params = {"pageSize": str(self.page_size), **({"pageToken": token} if token else {})}
            page = await self.http.json("GET", f"/{self.version}/batches", params=params)
            for op in page.get("operations") or []:
                meta = op.get("metadata") or {}
                if (meta.get("displayName") or meta.get("display_name")) == batch_id and op.get("name"):
                    return str(op["name"])
            token = page.get("nextPageToken") or ""
            if not token:
                return None
        log.warning("%s: batch %s not found in the first %d pages of batches", self.name, batch_id, self.find_pages)
        return None

    async def poll(self, provider_batch_id: str) -> ProviderStatus:
        return operation_status(await self._operation(provider_batch_id))

    async def results(self, provider_batch_id: str) -> AsyncIterator[LineResult]:
        op = await self._operation(provider_batch_id)
        meta = op.get("metadata") or {}
        model = str(meta.get("model") or "").removeprefix("models/")
        output = _output(op)
        inlined = output.get("inlinedResponses")
        if isinstance(inlined, dict):
            inlined = inlined.get("inlinedResponses")
        if isinstance(inlined, list):
            for position, item in enumerate(inlined):
                if not isinstance(item, dict):
                    continue
                key = (item.get("metadata") or {}).get("key")
                index = parse_line_id(key) if isinstance(key, str) else position
                if index is None:
                    log.warning("%s: inlined response with unknown key %r; ignored", self.name, key)
                    continue
                yield to_line_result(index, item, model)
            return
        file_name = output.get("responsesFile")
        if not file_name:
            return  # FAILED / CANCELLED / EXPIRED batches have no results
        async for row in iter_jsonl(self.http, f"/download/{self.version}/{file_name}:download",
                                    params={"alt": "media"}):
            key = row.get("key") if isinstance(row, dict) else None
            index = parse_line_id(key) if isinstance(key, str) else None
            if index is None:
                log.warning("%s: result line with unknown key %r; ignored", self.name, key)
                continue
            yield to_line_result(index, row, model)

    async def send_cancel(self, provider_batch_id: str) -> None:
        await self.http.json("POST", f"/{self.version}/{provider_batch_id}:cancel")
