from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Project(_message.Message):
    __slots__ = ("id", "object", "name", "created_at", "archived_at", "status", "monthly_budget_usd", "source")
    ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ARCHIVED_AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    object: str
    name: str
    created_at: int
    archived_at: int
    status: str
    monthly_budget_usd: float
    source: str
    def __init__(self, id: _Optional[str] = ..., object: _Optional[str] = ..., name: _Optional[str] = ..., created_at: _Optional[int] = ..., archived_at: _Optional[int] = ..., status: _Optional[str] = ..., monthly_budget_usd: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class ListProjectsRequest(_message.Message):
    __slots__ = ("limit", "after", "include_archived")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    limit: int
    after: str
    include_archived: bool
    def __init__(self, limit: _Optional[int] = ..., after: _Optional[str] = ..., include_archived: _Optional[bool] = ...) -> None: ...

class ListProjectsResponse(_message.Message):
    __slots__ = ("object", "data", "first_id", "last_id", "has_more")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FIRST_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    object: str
    data: _containers.RepeatedCompositeFieldContainer[Project]
    first_id: str
    last_id: str
    has_more: bool
    def __init__(self, object: _Optional[str] = ..., data: _Optional[_Iterable[_Union[Project, _Mapping]]] = ..., first_id: _Optional[str] = ..., last_id: _Optional[str] = ..., has_more: _Optional[bool] = ...) -> None: ...

class CreateProjectRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetProjectRequest(_message.Message):
    __slots__ = ("project_id",)
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    def __init__(self, project_id: _Optional[str] = ...) -> None: ...

class ArchiveProjectRequest(_message.Message):
    __slots__ = ("project_id",)
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    def __init__(self, project_id: _Optional[str] = ...) -> None: ...

class SetProjectBudgetRequest(_message.Message):
    __slots__ = ("project_id", "monthly_budget_usd")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    monthly_budget_usd: float
    def __init__(self, project_id: _Optional[str] = ..., monthly_budget_usd: _Optional[float] = ...) -> None: ...

class ProjectApiKeyOwner(_message.Message):
    __slots__ = ("type",)
    TYPE_FIELD_NUMBER: _ClassVar[int]
    type: str
    def __init__(self, type: _Optional[str] = ...) -> None: ...

class ProjectApiKey(_message.Message):
    __slots__ = ("object", "redacted_value", "name", "created_at", "last_used_at", "id", "owner", "project_id", "source", "value", "owner_project_access")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    REDACTED_VALUE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    OWNER_PROJECT_ACCESS_FIELD_NUMBER: _ClassVar[int]
    object: str
    redacted_value: str
    name: str
    created_at: int
    last_used_at: int
    id: str
    owner: ProjectApiKeyOwner
    project_id: str
    source: str
    value: str
    owner_project_access: str
    def __init__(self, object: _Optional[str] = ..., redacted_value: _Optional[str] = ..., name: _Optional[str] = ..., created_at: _Optional[int] = ..., last_used_at: _Optional[int] = ..., id: _Optional[str] = ..., owner: _Optional[_Union[ProjectApiKeyOwner, _Mapping]] = ..., project_id: _Optional[str] = ..., source: _Optional[str] = ..., value: _Optional[str] = ..., owner_project_access: _Optional[str] = ...) -> None: ...

class ListProjectApiKeysRequest(_message.Message):
    __slots__ = ("project_id", "limit", "after")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    limit: int
    after: str
    def __init__(self, project_id: _Optional[str] = ..., limit: _Optional[int] = ..., after: _Optional[str] = ...) -> None: ...

class ListProjectApiKeysResponse(_message.Message):
    __slots__ = ("object", "data", "first_id", "last_id", "has_more")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FIRST_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    object: str
    data: _containers.RepeatedCompositeFieldContainer[ProjectApiKey]
    first_id: str
    last_id: str
    has_more: bool
    def __init__(self, object: _Optional[str] = ..., data: _Optional[_Iterable[_Union[ProjectApiKey, _Mapping]]] = ..., first_id: _Optional[str] = ..., last_id: _Optional[str] = ..., has_more: _Optional[bool] = ...) -> None: ...

class CreateProjectApiKeyRequest(_message.Message):
    __slots__ = ("project_id", "name")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    name: str
    def __init__(self, project_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class GetProjectApiKeyRequest(_message.Message):
    __slots__ = ("project_id", "key_id")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    key_id: str
    def __init__(self, project_id: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class DeleteProjectApiKeyRequest(_message.Message):
    __slots__ = ("project_id", "key_id")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    key_id: str
    def __init__(self, project_id: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class DeleteProjectApiKeyResponse(_message.Message):
    __slots__ = ("object", "id", "deleted")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    object: str
    id: str
    deleted: bool
    def __init__(self, object: _Optional[str] = ..., id: _Optional[str] = ..., deleted: _Optional[bool] = ...) -> None: ...

class ProjectWebhookEndpoint(_message.Message):
    __slots__ = ("id", "object", "url", "event_types", "enabled", "created_at", "project_id", "source", "secret", "progress_thresholds")
    ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    object: str
    url: str
    event_types: _containers.RepeatedScalarFieldContainer[str]
    enabled: bool
    created_at: int
    project_id: str
    source: str
    secret: str
    progress_thresholds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[str] = ..., object: _Optional[str] = ..., url: _Optional[str] = ..., event_types: _Optional[_Iterable[str]] = ..., enabled: _Optional[bool] = ..., created_at: _Optional[int] = ..., project_id: _Optional[str] = ..., source: _Optional[str] = ..., secret: _Optional[str] = ..., progress_thresholds: _Optional[_Iterable[int]] = ...) -> None: ...

class ListProjectWebhookEndpointsRequest(_message.Message):
    __slots__ = ("project_id",)
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    def __init__(self, project_id: _Optional[str] = ...) -> None: ...

class ListProjectWebhookEndpointsResponse(_message.Message):
    __slots__ = ("object", "data")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    object: str
    data: _containers.RepeatedCompositeFieldContainer[ProjectWebhookEndpoint]
    def __init__(self, object: _Optional[str] = ..., data: _Optional[_Iterable[_Union[ProjectWebhookEndpoint, _Mapping]]] = ...) -> None: ...

class CreateProjectWebhookEndpointRequest(_message.Message):
    __slots__ = ("project_id", "url", "event_types", "progress_thresholds")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    url: str
    event_types: _containers.RepeatedScalarFieldContainer[str]
    progress_thresholds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, project_id: _Optional[str] = ..., url: _Optional[str] = ..., event_types: _Optional[_Iterable[str]] = ..., progress_thresholds: _Optional[_Iterable[int]] = ...) -> None: ...

class DeleteProjectWebhookEndpointRequest(_message.Message):
    __slots__ = ("project_id", "endpoint_id")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    endpoint_id: str
    def __init__(self, project_id: _Optional[str] = ..., endpoint_id: _Optional[str] = ...) -> None: ...

class DeleteProjectWebhookEndpointResponse(_message.Message):
    __slots__ = ("object", "id", "deleted")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    object: str
    id: str
    deleted: bool
    def __init__(self, object: _Optional[str] = ..., id: _Optional[str] = ..., deleted: _Optional[bool] = ...) -> None: ...
