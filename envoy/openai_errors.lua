-- Sluice's REST edge policy, around Envoy's gRPC-JSON transcoder: refuse what the transcoder
-- would misread, and give every error OpenAI's envelope without leaking internals.
--
-- Placed BEFORE grpc_json_transcoder in http_filters: requests reach it before they are
-- transcoded, and on the response path it runs after the transcoder and sees the HTTP status it
-- mapped plus the grpc-* headers of a trailers-only error (how grpc.aio sends an abort). It also
-- sees every local reply of Envoy itself (transcoder 400/404, 413, 431, router 503/504).
--
-- Requests (REST only; native gRPC, content-type application/grpc*, is never touched):
-- * Path segments and query values must decode (percent-encoding) to UTF-8 text without NUL;
--   a query parameter may appear once. The transcoder would pass bad bytes on as a protobuf
--   string the server cannot parse.
-- * A body on POST /v1/batches[/estimate|/{id}/cancel|/{id}/retry] must be JSON (Content-Type
--   application/json).
-- * The body of POST /v1/batches and /v1/batches/estimate (at most MAX_INLINE_BYTES) must be an
--   object whose keys are CreateBatchRequest's, and that of POST /v1/batches/{id}/retry
--   RetryBatchRequest's, with the right JSON types: the transcoder silently drops unknown keys
--   (`completion_windw`, `custom_id` for `custom_ids`) and accepts one object where a list belongs.
-- Responses:
-- * Success (no grpc-status, or 0): grpc-* headers are stripped and the body is NOT buffered
--   (streamed downloads stay streamed).
-- * A service error: the body becomes the service's `x-openai-error` envelope; `x-http-status`
--   (if any) overrides :status. An error the service did not shape (gRPC's own limits, an
--   uncaught exception) gets a fixed message per case, never gRPC's text (which can name
--   protobuf classes or list the request's headers).
-- * An Envoy local reply: rewritten from the transcoder's wording (protobuf type names, TYPE_*)
--   into OpenAI's, naming the parameter at fault.
-- grpc-*, x-openai-error and x-http-status never reach a REST client; other metadata
-- (retry-after, x-should-retry) passes through as headers.

local FILTER = "sluice.openai_errors"
-- Keep in step with service/domain/model.py (tests/test_edge_policy.py checks).
local MAX_INLINE_BYTES = 16777216
local MAX_HEADERS_KB = 32
local MAX_CLIP = 64

-- gRPC code -> { HTTP status, OpenAI error type, message } for errors the service did not shape.
local BY_CODE = {
  [1]  = { 499, "invalid_request_error", "The request was cancelled." },                   -- CANCELLED
  [2]  = { 500, "server_error", "The server had an error while processing your request." }, -- UNKNOWN
  [3]  = { 400, "invalid_request_error", "The request is not valid." },                     -- INVALID_ARGUMENT
  [4]  = { 504, "server_error", "The server did not answer in time." },                     -- DEADLINE_EXCEEDED
  [5]  = { 404, "not_found_error", "Not found." },                                          -- NOT_FOUND
  [6]  = { 409, "invalid_request_error", "The object already exists." },                    -- ALREADY_EXISTS
  [7]  = { 403, "authentication_error", "Permission denied." },                             -- PERMISSION_DENIED
  [8]  = { 503, "server_error", "The server is overloaded; retry shortly." },               -- RESOURCE_EXHAUSTED
  [9]  = { 400, "invalid_request_error", "The request is not valid in the current state." },-- FAILED_PRECONDITION
  [10] = { 409, "invalid_request_error", "The request conflicted with another one." },      -- ABORTED
  [11] = { 400, "invalid_request_error", "A value is out of range." },                      -- OUT_OF_RANGE
  [12] = { 501, "server_error", "Not implemented." },                                       -- UNIMPLEMENTED
  [13] = { 500, "server_error", "The server had an error while processing your request." }, -- INTERNAL
  [14] = { 503, "server_error", "The server is unavailable; retry shortly." },              -- UNAVAILABLE
  [15] = { 500, "server_error", "The server had an error while processing your request." }, -- DATA_LOSS
  [16] = { 401, "authentication_error", "Authentication failed." },                         -- UNAUTHENTICATED
}

local TOO_LARGE = "The request is too large: POST /v1/batches takes at most 16 MiB (JSON or protobuf). " ..
  "Upload larger batches as a file (POST /v1/files, up to 200 MB) and pass its input_file_id."
local HEADERS_TOO_LARGE = "The request headers are too large (at most " .. MAX_HEADERS_KB ..
  " KiB and 100 headers in all)."

-- --------------------------------------------------------------------------- helpers

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

local function json_or_null(s)
  if s == nil then return "null" end
  return json_string(s)
end

local function envelope(message, error_type, param, code)
  return '{"error":{"message":' .. json_string(message) .. ',"type":"' .. error_type .. '","param":' ..
    json_or_null(param) .. ',"code":' .. json_or_null(code) .. '}}'
end

-- Printable ASCII only, cut at `limit` characters: safe to put in a message.
local function clip(s, limit)
  limit = limit or MAX_CLIP
  local cut = s
  local more = ""
  if #cut > limit then
    cut = cut:sub(1, limit)
    more = "..."
  end
  cut = cut:gsub("[^\32-\126]", "?")
  return "'" .. cut .. more .. "'"
end

local function percent_decode(s)
  return (s:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

-- Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF) without NUL.
local function is_text(s)
  if s:find("%z") then
    return false
  end
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    if c < 0x80 then
      i = i + 1
    else
      local len, min
      if c >= 0xC2 and c <= 0xDF then len, min = 2, 0x80
      elseif c >= 0xE0 and c <= 0xEF then len, min = 3, 0x800
      elseif c >= 0xF0 and c <= 0xF4 then len, min = 4, 0x10000
      else return false end
      if i + len - 1 > n then return false end
      local cp = c % (2 ^ (7 - len))
      for k = 1, len - 1 do
        local b = s:byte(i + k)
        if b < 0x80 or b > 0xBF then return false end
        cp = cp * 64 + (b - 0x80)
      end
      if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return false end
      i = i + len
    end
  end
  return true
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

-- A reply from this filter. Its envelope travels in a header: Envoy's local_reply_config would
-- wrap a body into another envelope; envoy_on_response puts it in place as the body.
local function reply(handle, status, message, error_type, param, code)
  handle:respond({ [":status"] = tostring(status), ["content-type"] = "application/json",
                   ["x-sluice-envelope"] = envelope(message, error_type, param, code) }, "")
end

-- --------------------------------------------------------------------------- request target

-- The name of path segment `index` (1-based, after the leading slash) for messages.
local function segment_param(segments, index)
  if index == 3 then return "id" end
  if index == 4 and segments[2] == "batches" then return "custom_id" end
  if index == 5 and segments[4] == "results" then return "custom_id" end
  return "path"
end

-- nil, or { param, message } for the first path segment or query parameter that is not text.
local function check_target(path)
  local raw_path, query = path:match("^([^?]*)%??(.*)$")
  local segments = {}
  for seg in raw_path:gmatch("[^/]+") do
    segments[#segments + 1] = seg
  end
  for index, seg in ipairs(segments) do
    if not is_text(percent_decode(seg)) then
      local param = segment_param(segments, index)
      return { param, "Invalid value for '" .. param .. "': it is not UTF-8 text without NUL characters." }
    end
  end
  local seen = {}
  for pair in query:gmatch("[^&]+") do
    local key, value = pair:match("^([^=]*)=?(.*)$")
    key = percent_decode((key:gsub("%+", " ")))
    value = percent_decode((value:gsub("%+", " ")))
    if not is_text(key) then
      return { nil, "A query parameter name is not UTF-8 text without NUL characters." }
    end
    if not is_text(value) then
      return { key, "Invalid value for " .. clip(key) .. ": it is not UTF-8 text without NUL characters." }
    end
    if seen[key] then
      return { key, "The query parameter " .. clip(key) .. " is given more than once." }
    end
    seen[key] = true
  end
  return nil
end

-- --------------------------------------------------------------------------- POST /v1/batches body

-- CreateBatchRequest's keys and the JSON type each takes ("null" is accepted for optional ones).
local CREATE_FIELDS = {
  input_file_id = { string = true },
  endpoint = { string = true },
  completion_window = { string = true },
  metadata = { object = true, null = true },
  requests = { array = true },
  output_expires_after = { object = true },
}
-- RetryBatchRequest's (the id is in the path).
local RETRY_FIELDS = {
  outcomes = { array = true },
  custom_ids = { array = true },
  model = { string = true },
  metadata = { object = true, null = true },
}
local KIND = { ['"'] = "string", ["{"] = "object", ["["] = "array", ["t"] = "boolean", ["f"] = "boolean",
               ["n"] = "null" }
local A = { string = "a string", object = "an object", array = "an array", number = "a number",
            boolean = "a boolean", null = "null" }

local function skip_ws(s, i)
  return s:find("[^ \t\r\n]", i)
end

-- Index after the JSON string starting at s[i] (a quote), or nil.
local function skip_string(s, i)
  local j = i + 1
  while true do
    local k = s:find('["\\]', j)
    if k == nil then return nil end
    if s:byte(k) == 34 then return k + 1 end -- '"'
    j = k + 2
  end
end

-- Index after the JSON value starting at s[i], or nil when it is not well-formed enough to skip
-- (the transcoder then reports the syntax error). Iterative: nesting costs no stack.
local function skip_value(s, i)
  local c = s:sub(i, i)
  if c == '"' then return skip_string(s, i) end
  if c ~= "{" and c ~= "[" then
    local j = s:find("[,}%]%s]", i)
    return j or (#s + 1)
  end
  local depth = 0
  local j = i
  while true do
    local k = s:find('[%[%]{}"]', j)
    if k == nil then return nil end
    local ch = s:byte(k)
    if ch == 34 then
      j = skip_string(s, k)
      if j == nil then return nil end
    else
      if ch == 91 or ch == 123 then depth = depth + 1 else depth = depth - 1 end
      j = k + 1
      if depth == 0 then return j end
    end
  end
end

local function kind_at(s, i)
  local c = s:sub(i, i)
  return KIND[c] or ((c:match("[%d%-]") and "number") or nil)
end

-- nil, or { status, message, param, code } for the first problem of a body whose keys are `fields`
-- (CREATE_FIELDS or RETRY_FIELDS). Syntax errors are left to the transcoder (its message is
-- rewritten on the way back).
local function check_body(s, fields)
  local i = skip_ws(s, 1)
  if i == nil then
    return nil
  end
  if s:sub(i, i) ~= "{" then
    return { 400, "The request body must be a JSON object.", nil, "invalid_type" }
  end
  i = i + 1
  local seen = {}
  while true do
    i = skip_ws(s, i)
    if i == nil then return nil end
    local c = s:sub(i, i)
    if c == "}" then return nil end
    if c == "," then
      i = skip_ws(s, i + 1)
      if i == nil then return nil end
    end
    if s:sub(i, i) ~= '"' then return nil end
    local after = skip_string(s, i)
    if after == nil then return nil end
    local key = s:sub(i + 1, after - 2)
    i = skip_ws(s, after)
    if i == nil or s:sub(i, i) ~= ":" then return nil end
    i = skip_ws(s, i + 1)
    if i == nil then return nil end
    local field = fields[key]
    if field == nil then
      return { 400, "Unknown parameter: " .. clip(key) .. ".", key:sub(1, MAX_CLIP), "unknown_parameter" }
    end
    if seen[key] then
      return { 400, "The parameter '" .. key .. "' is given more than once.", key, "duplicate_parameter" }
    end
    seen[key] = true
    local kind = kind_at(s, i)
    if kind == nil then return nil end
    if not field[kind] then
      local want = A[next(field)]
      if key == "metadata" then want = "an object" end
      return { 400, "Invalid type for '" .. key .. "': expected " .. want .. ", but got " .. A[kind] .. " instead.",
               key, "invalid_type" }
    end
    if key == "requests" then
      -- Each element must be an object (a request line).
      local j = skip_ws(s, i + 1)
      local index = 0
      while j ~= nil and s:sub(j, j) ~= "]" do
        if s:sub(j, j) == "," then
          j = skip_ws(s, j + 1)
          if j == nil then return nil end
        end
        local element = kind_at(s, j)
        if element ~= "object" then
          if element == nil then return nil end
          local param = "requests[" .. index .. "]"
          return { 400, "Invalid type for '" .. param .. "': expected an object (a request line), but got " ..
                   A[element] .. " instead.", param, "invalid_type" }
        end
        j = skip_value(s, j)
        if j == nil then return nil end
        j = skip_ws(s, j)
        index = index + 1
      end
      if j == nil then return nil end
      i = j + 1
    else
      i = skip_value(s, i)
      if i == nil then return nil end
    end
  end
end

local function is_json(content_type)
  local media = string.lower(content_type):match("^%s*([^;%s]+)")
  return media == "application/json" or (media ~= nil and media:match("^application/[%w.%-]+%+json$") ~= nil)
end

-- Headers a REST client may send but gRPC cannot carry as metadata (a name outside [0-9a-z_.-],
-- a value outside printable ASCII, a `-bin` name whose value is not base64, gRPC's own `grpc-*`):
-- dropped, so they can never make the gRPC server refuse the call. They mean nothing to Sluice.
local function drop_non_grpc_headers(headers)
  local doomed = {}
  for name, value in pairs(headers) do
    if name:sub(1, 1) ~= ":" then
      if name:find("[^0-9a-z_.%-]") or name:sub(-4) == "-bin" or name:sub(1, 5) == "grpc-" or
          value:find("[^\32-\126]") then
        doomed[#doomed + 1] = name
      end
    end
  end
  for _, name in ipairs(doomed) do
    headers:remove(name)
  end
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local ct = headers:get("content-type") or ""
  if string.lower(ct):sub(1, 16) == "application/grpc" then
    handle:streamInfo():dynamicMetadata():set(FILTER, "native_grpc", true)
    return
  end
  drop_non_grpc_headers(headers)
  local path = headers:get(":path") or ""
  local method = headers:get(":method")
  handle:streamInfo():dynamicMetadata():set(FILTER, "method", method or "?")
  handle:streamInfo():dynamicMetadata():set(FILTER, "path", path:sub(1, 200))
  local bad = check_target(path)
  if bad ~= nil then
    reply(handle, 400, bad[2], "invalid_request_error", bad[1], "invalid_encoding")
    return
  end
  local route = path:match("^[^?]*")
  local create = route == "/v1/batches" or route == "/v1/batches/" or route:match("^/v1/batches/estimate/?$") ~= nil
  local fields = create and CREATE_FIELDS or (route:match("^/v1/batches/[^/]+/retry/?$") and RETRY_FIELDS) or nil
  if method ~= "POST" or not (fields or route:match("^/v1/batches/[^/]+/cancel/?$")) then
    return
  end
  local length = tonumber(headers:get("content-length") or "")
  if length == 0 then
    return -- no body: the service names the missing parameters
  end
  if create and length ~= nil and length > MAX_INLINE_BYTES then
    reply(handle, 413, TOO_LARGE, "invalid_request_error", "requests", "request_too_large")
    return
  end
  -- Whether a body comes is known only by waiting for it (HTTP/2 needs no content-length);
  -- a body over the route's buffer limit is Envoy's 413 (rewritten on the way out).
  local body = handle:body()
  if body == nil or body:length() == 0 then
    return
  end
  if not is_json(ct) then
    reply(handle, 400, "The request body must be JSON, sent with 'Content-Type: application/json' (got " ..
          clip(ct, 40) .. ").", "invalid_request_error", nil, "invalid_content_type")
    return
  end
  if fields == nil then
    return
  end
  local problem = check_body(body:getBytes(0, body:length()), fields)
  if problem ~= nil then
    reply(handle, problem[1], problem[2], "invalid_request_error", problem[3], problem[4])
  end
end

-- --------------------------------------------------------------------------- responses

-- The "message" of a local reply's JSON body (local_reply_config), unescaped enough to match on.
local function local_reply_message(text)
  local raw = text:match('"message":"(.-)","param"') or text:match('"message":"(.-)"') or ""
  return (raw:gsub('\\(.)', function(c)
    if c == "n" then return "\n" end
    if c == "t" then return "\t" end
    return c
  end))
end

local TYPE_WORDS = {
  STRING = "a string", INT32 = "an integer", INT64 = "an integer", UINT32 = "a non-negative integer",
  UINT64 = "a non-negative integer", BOOL = "a boolean", DOUBLE = "a number", FLOAT = "a number",
  MESSAGE = "an object", ENUM = "one of the allowed values",
}

-- { status, type, message, param, code } for an Envoy local reply (status, message).
local function rewrite_local_reply(status, message, method, path)
  if status == 400 then
    local field, value, proto_type = message:match("^(.-): invalid value (.-) for type TYPE_(%u+%d*)")
    if field ~= nil then
      value = value:gsub('^"(.*)"$', "%1")
      return { 400, "invalid_request_error", "Invalid type for " .. clip(field) .. ": expected " ..
               (TYPE_WORDS[proto_type] or "another type") .. ", but got " .. clip(value, 32) .. ".",
               field:sub(1, MAX_CLIP), "invalid_type" }
    end
    local unknown = message:match('Could not find field "(.-)" in the type')
    if unknown ~= nil then
      return { 400, "invalid_request_error", "Unknown parameter: " .. clip(unknown) .. ".",
               unknown:sub(1, MAX_CLIP), "unknown_parameter" }
    end
    local oneof = message:match("oneof '_([%w_]+)'")
    if oneof ~= nil then
      return { 400, "invalid_request_error", "Invalid value for '" .. oneof .. "'.", oneof, "invalid_value" }
    end
    if message:find("too deep", 1, true) then
      return { 400, "invalid_request_error", "The JSON body nests too deeply (a request line may nest 32 " ..
               "levels).", nil, "invalid_json" }
    end
    return { 400, "invalid_request_error", "We could not parse the JSON body of your request: it is not " ..
             "valid JSON for this endpoint.", nil, "invalid_json" }
  end
  if status == 404 then
    return { 404, "invalid_request_error", "Invalid URL (" .. (method or "?") .. " " ..
             clip(path or "", 100):sub(2, -2) .. "): no such route.", nil, "unknown_url" }
  end
  if status == 413 then
    return { 413, "invalid_request_error", TOO_LARGE, nil, "request_too_large" }
  end
  if status == 431 then
    return { 431, "invalid_request_error", HEADERS_TOO_LARGE, nil, "headers_too_large" }
  end
  if status == 408 or status == 504 then
    return { 504, "server_error", "The server did not answer in time; retry shortly.", nil, "upstream_timeout" }
  end
  if status == 502 or status == 503 then
    return { 503, "server_error", "The server is unavailable; retry shortly.", nil, "upstream_unavailable" }
  end
  if status >= 500 then
    return { status, "server_error", "The gateway could not complete the request.", nil, nil }
  end
  return { status, "invalid_request_error", "The request could not be processed.", nil, nil }
end

local function set_body(handle, headers, status, text)
  local body = handle:body(true)
  body:setBytes(text)
  strip_grpc_headers(headers)
  headers:replace(":status", tostring(status))
  headers:replace("content-type", "application/json")
  headers:replace("content-length", tostring(#text))
end

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get(FILTER)
  if meta ~= nil and meta["native_grpc"] then
    return
  end
  local headers = handle:headers()
  local grpc_status = headers:get("grpc-status")
  local status = tonumber(headers:get(":status") or "") or 500

  if grpc_status == nil or grpc_status == "0" then
    local own = headers:get("x-sluice-envelope")
    if own ~= nil then
      headers:remove("x-sluice-envelope")
      set_body(handle, headers, status, own)
      return
    end
    if status < 400 then
      strip_grpc_headers(headers) -- success: never buffered
      return
    end
    -- An Envoy local reply (the transcoder's 400/404, 413, 431, the router's 503/504).
    local body = handle:body(true)
    local message = local_reply_message(body:getBytes(0, body:length()))
    local req = handle:streamInfo():dynamicMetadata():get(FILTER) or {}
    local r = rewrite_local_reply(status, message, req["method"], req["path"])
    set_body(handle, headers, r[1], envelope(r[3], r[2], r[4], r[5]))
    return
  end

  local code = tonumber(grpc_status) or 2
  local message = headers:get("grpc-message") or ""
  local shaped = headers:get("x-openai-error")
  local override = tonumber(headers:get("x-http-status") or "")
  if shaped ~= nil and shaped ~= "" then
    if override ~= nil and override >= 400 and override <= 599 then
      status = math.floor(override)
    end
    set_body(handle, headers, status, shaped)
    return
  end
  -- Not shaped by the service: gRPC's own errors. Never echo grpc-message.
  local mapped = BY_CODE[code] or BY_CODE[2]
  local text = envelope(mapped[3], mapped[2], nil, nil)
  status = mapped[1]
  if code == 8 and message:find("larger than max", 1, true) ~= nil then
    status = 413
    text = envelope(TOO_LARGE, "invalid_request_error", "requests", "request_too_large")
  elseif code == 8 and message:find("metadata", 1, true) ~= nil then
    status = 431
    text = envelope(HEADERS_TOO_LARGE, "invalid_request_error", nil, "headers_too_large")
  end
  set_body(handle, headers, status, text)
end
