from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Batch(_message.Message):
    __slots__ = ("id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window", "status", "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts", "metadata", "usage", "provider", "provider_batch_id", "parts", "retry_of", "retries", "merged_output_file_id", "merged_error_file_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_WINDOW_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    IN_PROGRESS_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    FINALIZING_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    FAILED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_AT_FIELD_NUMBER: _ClassVar[int]
    CANCELLING_AT_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    RETRY_OF_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    MERGED_OUTPUT_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    MERGED_ERROR_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    object: str
    endpoint: str
    model: str
    errors: BatchErrors
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str
    error_file_id: str
    created_at: int
    in_progress_at: int
    expires_at: int
    finalizing_at: int
    completed_at: int
    failed_at: int
    expired_at: int
    cancelling_at: int
    cancelled_at: int
    request_counts: BatchRequestCounts
    metadata: _struct_pb2.Struct
    usage: BatchUsage
    provider: str
    provider_batch_id: str
    parts: _containers.RepeatedCompositeFieldContainer[BatchPart]
    retry_of: str
    retries: _containers.RepeatedScalarFieldContainer[str]
    merged_output_file_id: str
    merged_error_file_id: str
    def __init__(self, id: _Optional[str] = ..., object: _Optional[str] = ..., endpoint: _Optional[str] = ..., model: _Optional[str] = ..., errors: _Optional[_Union[BatchErrors, _Mapping]] = ..., input_file_id: _Optional[str] = ..., completion_window: _Optional[str] = ..., status: _Optional[str] = ..., output_file_id: _Optional[str] = ..., error_file_id: _Optional[str] = ..., created_at: _Optional[int] = ..., in_progress_at: _Optional[int] = ..., expires_at: _Optional[int] = ..., finalizing_at: _Optional[int] = ..., completed_at: _Optional[int] = ..., failed_at: _Optional[int] = ..., expired_at: _Optional[int] = ..., cancelling_at: _Optional[int] = ..., cancelled_at: _Optional[int] = ..., request_counts: _Optional[_Union[BatchRequestCounts, _Mapping]] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., usage: _Optional[_Union[BatchUsage, _Mapping]] = ..., provider: _Optional[str] = ..., provider_batch_id: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[BatchPart, _Mapping]]] = ..., retry_of: _Optional[str] = ..., retries: _Optional[_Iterable[str]] = ..., merged_output_file_id: _Optional[str] = ..., merged_error_file_id: _Optional[str] = ...) -> None: ...

class BatchPart(_message.Message):
    __slots__ = ("part", "provider", "model", "status", "provider_batch_id", "provider_status", "request_counts", "errors")
    PART_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_STATUS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    part: int
    provider: str
    model: str
    status: str
    provider_batch_id: str
    provider_status: str
    request_counts: BatchRequestCounts
    errors: BatchErrors
    def __init__(self, part: _Optional[int] = ..., provider: _Optional[str] = ..., model: _Optional[str] = ..., status: _Optional[str] = ..., provider_batch_id: _Optional[str] = ..., provider_status: _Optional[str] = ..., request_counts: _Optional[_Union[BatchRequestCounts, _Mapping]] = ..., errors: _Optional[_Union[BatchErrors, _Mapping]] = ...) -> None: ...

class BatchRequestCounts(_message.Message):
    __slots__ = ("total", "completed", "failed")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    total: int
    completed: int
    failed: int
    def __init__(self, total: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ...) -> None: ...

class BatchUsage(_message.Message):
    __slots__ = ("input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details", "total_tokens", "input_cost", "output_cost", "total_cost")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_DETAILS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_DETAILS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_COST_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_COST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COST_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int
    input_cost: float
    output_cost: float
    total_cost: float
    def __init__(self, input_tokens: _Optional[int] = ..., input_tokens_details: _Optional[_Union[InputTokensDetails, _Mapping]] = ..., output_tokens: _Optional[int] = ..., output_tokens_details: _Optional[_Union[OutputTokensDetails, _Mapping]] = ..., total_tokens: _Optional[int] = ..., input_cost: _Optional[float] = ..., output_cost: _Optional[float] = ..., total_cost: _Optional[float] = ...) -> None: ...

class InputTokensDetails(_message.Message):
    __slots__ = ("cached_tokens",)
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    cached_tokens: int
    def __init__(self, cached_tokens: _Optional[int] = ...) -> None: ...

class OutputTokensDetails(_message.Message):
    __slots__ = ("reasoning_tokens",)
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    reasoning_tokens: int
    def __init__(self, reasoning_tokens: _Optional[int] = ...) -> None: ...

class BatchErrors(_message.Message):
    __slots__ = ("object", "data")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    object: str
    data: _containers.RepeatedCompositeFieldContainer[BatchError]
    def __init__(self, object: _Optional[str] = ..., data: _Optional[_Iterable[_Union[BatchError, _Mapping]]] = ...) -> None: ...

class BatchError(_message.Message):
    __slots__ = ("code", "message", "param", "line")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    param: str
    line: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., param: _Optional[str] = ..., line: _Optional[int] = ...) -> None: ...

class BatchRequestLine(_message.Message):
    __slots__ = ("custom_id", "method", "url", "body")
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    custom_id: str
    method: str
    url: str
    body: _struct_pb2.Struct
    def __init__(self, custom_id: _Optional[str] = ..., method: _Optional[str] = ..., url: _Optional[str] = ..., body: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CreateBatchRequest(_message.Message):
    __slots__ = ("input_file_id", "endpoint", "completion_window", "metadata", "requests", "output_expires_after")
    INPUT_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_WINDOW_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_EXPIRES_AFTER_FIELD_NUMBER: _ClassVar[int]
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: _struct_pb2.Struct
    requests: _containers.RepeatedCompositeFieldContainer[BatchRequestLine]
    output_expires_after: FileExpiresAfter
    def __init__(self, input_file_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., completion_window: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., requests: _Optional[_Iterable[_Union[BatchRequestLine, _Mapping]]] = ..., output_expires_after: _Optional[_Union[FileExpiresAfter, _Mapping]] = ...) -> None: ...

class FileExpiresAfter(_message.Message):
    __slots__ = ("anchor", "seconds")
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    anchor: str
    seconds: int
    def __init__(self, anchor: _Optional[str] = ..., seconds: _Optional[int] = ...) -> None: ...

class GetBatchRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListBatchesRequest(_message.Message):
    __slots__ = ("limit", "after")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    limit: int
    after: str
    def __init__(self, limit: _Optional[int] = ..., after: _Optional[str] = ...) -> None: ...

class ListBatchesResponse(_message.Message):
    __slots__ = ("object", "data", "first_id", "last_id", "has_more")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FIRST_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    object: str
    data: _containers.RepeatedCompositeFieldContainer[Batch]
    first_id: str
    last_id: str
    has_more: bool
    def __init__(self, object: _Optional[str] = ..., data: _Optional[_Iterable[_Union[Batch, _Mapping]]] = ..., first_id: _Optional[str] = ..., last_id: _Optional[str] = ..., has_more: _Optional[bool] = ...) -> None: ...

class CancelBatchRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("custom_id", "index", "model", "provider", "status_code", "url", "response", "error", "status", "usage", "batch_id", "attempt")
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    custom_id: str
    index: int
    model: str
    provider: str
    status_code: int
    url: str
    response: _struct_pb2.Struct
    error: BatchResultError
    status: str
    usage: BatchUsage
    batch_id: str
    attempt: int
    def __init__(self, custom_id: _Optional[str] = ..., index: _Optional[int] = ..., model: _Optional[str] = ..., provider: _Optional[str] = ..., status_code: _Optional[int] = ..., url: _Optional[str] = ..., response: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error: _Optional[_Union[BatchResultError, _Mapping]] = ..., status: _Optional[str] = ..., usage: _Optional[_Union[BatchUsage, _Mapping]] = ..., batch_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class BatchResultError(_message.Message):
    __slots__ = ("message", "type", "code")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    message: str
    type: str
    code: str
    def __init__(self, message: _Optional[str] = ..., type: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...

class ListBatchResultsRequest(_message.Message):
    __slots__ = ("id", "limit", "after", "across_retries")
    ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    ACROSS_RETRIES_FIELD_NUMBER: _ClassVar[int]
    id: str
    limit: int
    after: str
    across_retries: bool
    def __init__(self, id: _Optional[str] = ..., limit: _Optional[int] = ..., after: _Optional[str] = ..., across_retries: _Optional[bool] = ...) -> None: ...

class ListBatchResultsResponse(_message.Message):
    __slots__ = ("object", "batch_id", "data", "first_id", "last_id", "has_more", "next_cursor")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FIRST_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    object: str
    batch_id: str
    data: _containers.RepeatedCompositeFieldContainer[BatchResult]
    first_id: str
    last_id: str
    has_more: bool
    next_cursor: str
    def __init__(self, object: _Optional[str] = ..., batch_id: _Optional[str] = ..., data: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ..., first_id: _Optional[str] = ..., last_id: _Optional[str] = ..., has_more: _Optional[bool] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class GetBatchResultRequest(_message.Message):
    __slots__ = ("batch_id", "custom_id")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    custom_id: str
    def __init__(self, batch_id: _Optional[str] = ..., custom_id: _Optional[str] = ...) -> None: ...

class WatchBatchRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchBatchResponse(_message.Message):
    __slots__ = ("type", "batch")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    type: str
    batch: Batch
    def __init__(self, type: _Optional[str] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ...) -> None: ...

class RetryBatchRequest(_message.Message):
    __slots__ = ("id", "outcomes", "custom_ids", "model", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    outcomes: _containers.RepeatedScalarFieldContainer[str]
    custom_ids: _containers.RepeatedScalarFieldContainer[str]
    model: str
    metadata: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., outcomes: _Optional[_Iterable[str]] = ..., custom_ids: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListResultAttemptsRequest(_message.Message):
    __slots__ = ("batch_id", "custom_id")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    custom_id: str
    def __init__(self, batch_id: _Optional[str] = ..., custom_id: _Optional[str] = ...) -> None: ...

class ListResultAttemptsResponse(_message.Message):
    __slots__ = ("object", "custom_id", "data")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    object: str
    custom_id: str
    data: _containers.RepeatedCompositeFieldContainer[BatchResult]
    def __init__(self, object: _Optional[str] = ..., custom_id: _Optional[str] = ..., data: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ...) -> None: ...

class EstimateBatchRequest(_message.Message):
    __slots__ = ("input_file_id", "endpoint", "completion_window", "metadata", "requests")
    INPUT_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_WINDOW_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: _struct_pb2.Struct
    requests: _containers.RepeatedCompositeFieldContainer[BatchRequestLine]
    def __init__(self, input_file_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., completion_window: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., requests: _Optional[_Iterable[_Union[BatchRequestLine, _Mapping]]] = ...) -> None: ...

class EstimateBatchResponse(_message.Message):
    __slots__ = ("object", "endpoint", "line_count", "parts", "input_tokens", "output_tokens_max", "cost_min", "cost_max", "method")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LINE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_MAX_FIELD_NUMBER: _ClassVar[int]
    COST_MIN_FIELD_NUMBER: _ClassVar[int]
    COST_MAX_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    object: str
    endpoint: str
    line_count: int
    parts: _containers.RepeatedCompositeFieldContainer[PartEstimate]
    input_tokens: TokenEstimate
    output_tokens_max: int
    cost_min: float
    cost_max: float
    method: str
    def __init__(self, object: _Optional[str] = ..., endpoint: _Optional[str] = ..., line_count: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[PartEstimate, _Mapping]]] = ..., input_tokens: _Optional[_Union[TokenEstimate, _Mapping]] = ..., output_tokens_max: _Optional[int] = ..., cost_min: _Optional[float] = ..., cost_max: _Optional[float] = ..., method: _Optional[str] = ...) -> None: ...

class PartEstimate(_message.Message):
    __slots__ = ("part", "provider", "model", "line_count", "input_tokens", "output_tokens_max", "lines_without_max_tokens", "cost_min", "cost_max", "input_per_mtok", "output_per_mtok", "batch_discount")
    PART_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LINE_COUNT_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_MAX_FIELD_NUMBER: _ClassVar[int]
    LINES_WITHOUT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_MIN_FIELD_NUMBER: _ClassVar[int]
    COST_MAX_FIELD_NUMBER: _ClassVar[int]
    INPUT_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    BATCH_DISCOUNT_FIELD_NUMBER: _ClassVar[int]
    part: int
    provider: str
    model: str
    line_count: int
    input_tokens: TokenEstimate
    output_tokens_max: int
    lines_without_max_tokens: int
    cost_min: float
    cost_max: float
    input_per_mtok: float
    output_per_mtok: float
    batch_discount: float
    def __init__(self, part: _Optional[int] = ..., provider: _Optional[str] = ..., model: _Optional[str] = ..., line_count: _Optional[int] = ..., input_tokens: _Optional[_Union[TokenEstimate, _Mapping]] = ..., output_tokens_max: _Optional[int] = ..., lines_without_max_tokens: _Optional[int] = ..., cost_min: _Optional[float] = ..., cost_max: _Optional[float] = ..., input_per_mtok: _Optional[float] = ..., output_per_mtok: _Optional[float] = ..., batch_discount: _Optional[float] = ...) -> None: ...

class TokenEstimate(_message.Message):
    __slots__ = ("estimate", "min", "max")
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    estimate: int
    min: int
    max: int
    def __init__(self, estimate: _Optional[int] = ..., min: _Optional[int] = ..., max: _Optional[int] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("month",)
    MONTH_FIELD_NUMBER: _ClassVar[int]
    month: str
    def __init__(self, month: _Optional[str] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("object", "project", "month", "limit", "spent", "reserved", "remaining")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    MONTH_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    object: str
    project: str
    month: str
    limit: float
    spent: float
    reserved: float
    remaining: float
    def __init__(self, object: _Optional[str] = ..., project: _Optional[str] = ..., month: _Optional[str] = ..., limit: _Optional[float] = ..., spent: _Optional[float] = ..., reserved: _Optional[float] = ..., remaining: _Optional[float] = ...) -> None: ...
