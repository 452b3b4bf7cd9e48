-- OpenAI error envelopes for REST responses of the gRPC-JSON transcoder.
--
-- Placed BEFORE grpc_json_transcoder in http_filters, so on the response path it runs after
-- the transcoder and sees the HTTP status it mapped plus the grpc-* headers of a
-- trailers-only error (how grpc.aio sends an abort before any message).
--
-- * Native gRPC requests (content-type application/grpc*) are never touched.
-- * Success (no grpc-status, or 0): the grpc-* headers are stripped and the body is NOT
--   buffered (streamed downloads stay streamed).
-- * Error: the body becomes the service's `x-openai-error` envelope, or one synthesized from
--   grpc-status/grpc-message; `x-http-status` (if any) overrides :status; content-type is
--   application/json; grpc-*, x-openai-error and x-http-status never reach the client.
--   Other metadata (retry-after, x-should-retry) passes through as headers.

local FILTER = "sluice.openai_errors"

-- gRPC code -> { HTTP status, OpenAI error type } for errors the service did not shape.
local BY_CODE = {
  [1]  = { 499, "invalid_request_error" },  -- CANCELLED
  [2]  = { 500, "server_error" },           -- UNKNOWN (uncaught exception)
  [3]  = { 400, "invalid_request_error" },  -- INVALID_ARGUMENT
  [4]  = { 504, "server_error" },           -- DEADLINE_EXCEEDED
  [5]  = { 404, "not_found_error" },        -- NOT_FOUND
  [6]  = { 409, "invalid_request_error" },  -- ALREADY_EXISTS
  [7]  = { 403, "authentication_error" },   -- PERMISSION_DENIED
  [8]  = { 429, "rate_limit_error" },       -- RESOURCE_EXHAUSTED
  [9]  = { 400, "invalid_request_error" },  -- FAILED_PRECONDITION
  [10] = { 409, "invalid_request_error" },  -- ABORTED
  [11] = { 400, "invalid_request_error" },  -- OUT_OF_RANGE
  [12] = { 501, "server_error" },           -- UNIMPLEMENTED
  [13] = { 500, "server_error" },           -- INTERNAL
  [14] = { 503, "server_error" },           -- UNAVAILABLE
  [15] = { 500, "server_error" },           -- DATA_LOSS
  [16] = { 401, "authentication_error" },   -- UNAUTHENTICATED
}

local function percent_decode(s)
  return (s:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

local function json_string(s)
  local escaped = s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    if c == "\r" then return "\\r" end
    if c == "\t" then return "\\t" end
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. escaped .. '"'
end

local function strip_grpc_headers(headers)
  local doomed = {}
  for key, _ in pairs(headers) do
    local k = string.lower(key)
    if k:sub(1, 5) == "grpc-" or k == "x-openai-error" or k == "x-http-status" then
      doomed[#doomed + 1] = key
    end
  end
  for _, key in ipairs(doomed) do
    headers:remove(key)
  end
end

function envoy_on_request(handle)
  local ct = handle:headers():get("content-type") or ""
  if string.lower(ct):sub(1, 16) == "application/grpc" then
    handle:streamInfo():dynamicMetadata():set(FILTER, "native_grpc", true)
  end
end

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get(FILTER)
  if meta ~= nil and meta["native_grpc"] then
    return
  end
  local headers = handle:headers()
  local grpc_status = headers:get("grpc-status")
  if grpc_status == nil or grpc_status == "0" then
    strip_grpc_headers(headers)
    return
  end

  local code = tonumber(grpc_status) or 2
  local message = percent_decode(headers:get("grpc-message") or "")
  local envelope = headers:get("x-openai-error")
  local override = tonumber(headers:get("x-http-status") or "")
  local mapped = BY_CODE[code] or { 500, "server_error" }
  local status = mapped[1]
  local error_type = mapped[2]

  -- gRPC's own size limits (e.g. an inline batch over the server's receive limit) are the
  -- client's fault, not a rate limit: 413, which the SDK does not retry.
  if code == 8 and envelope == nil and message:find("larger than max", 1, true) ~= nil then
    status = 413
    error_type = "invalid_request_error"
  end
  if envelope == nil or envelope == "" then
    if message == "" then
      message = "gRPC status " .. tostring(code)
    end
    envelope = '{"error":{"message":' .. json_string(message) .. ',"type":"' .. error_type ..
      '","param":null,"code":null}}'
  end
  if override ~= nil and override >= 400 and override <= 599 then
    status = math.floor(override)
  end

  -- Trailers-only errors have no body: always_wrap_body gives one to replace.
  local body = handle:body(true)
  body:setBytes(envelope)
  strip_grpc_headers(headers)
  headers:replace(":status", tostring(status))
  headers:replace("content-type", "application/json")
  headers:replace("content-length", tostring(#envelope))
end
