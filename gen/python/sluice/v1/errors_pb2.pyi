from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_TYPE_UNSPECIFIED: _ClassVar[ErrorType]
    ERROR_TYPE_INVALID_REQUEST_ERROR: _ClassVar[ErrorType]
    ERROR_TYPE_AUTHENTICATION_ERROR: _ClassVar[ErrorType]
    ERROR_TYPE_NOT_FOUND_ERROR: _ClassVar[ErrorType]
    ERROR_TYPE_RATE_LIMIT_ERROR: _ClassVar[ErrorType]
    ERROR_TYPE_PROVIDER_ERROR: _ClassVar[ErrorType]
    ERROR_TYPE_SERVER_ERROR: _ClassVar[ErrorType]
    ERROR_TYPE_NOT_IMPLEMENTED_ERROR: _ClassVar[ErrorType]
    ERROR_TYPE_INSUFFICIENT_QUOTA: _ClassVar[ErrorType]
ERROR_TYPE_UNSPECIFIED: ErrorType
ERROR_TYPE_INVALID_REQUEST_ERROR: ErrorType
ERROR_TYPE_AUTHENTICATION_ERROR: ErrorType
ERROR_TYPE_NOT_FOUND_ERROR: ErrorType
ERROR_TYPE_RATE_LIMIT_ERROR: ErrorType
ERROR_TYPE_PROVIDER_ERROR: ErrorType
ERROR_TYPE_SERVER_ERROR: ErrorType
ERROR_TYPE_NOT_IMPLEMENTED_ERROR: ErrorType
ERROR_TYPE_INSUFFICIENT_QUOTA: ErrorType

class ErrorResponse(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: Error
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("message", "type", "param", "code")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    message: str
    type: str
    param: str
    code: str
    def __init__(self, message: _Optional[str] = ..., type: _Optional[str] = ..., param: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...
