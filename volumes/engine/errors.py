"""The engine's one error family: each class carries the API's HTTP status and error code."""

from __future__ import annotations

from typing import ClassVar


class EngineError(Exception):
    """A detached operation failed; ``status`` and ``code`` are the API's."""

    status: ClassVar[int] = 502
    code: ClassVar[str] = "volume_tool_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidPath(EngineError):
    status, code = 422, "invalid_path"


class InvalidMode(EngineError):
    status, code = 422, "invalid_mode"


class InvalidArgument(EngineError):
    status, code = 422, "invalid_argument"


class NotFound(EngineError):
    status, code = 404, "path_not_found"


class AlreadyExists(EngineError):
    status, code = 409, "path_exists"


class NotADirectory(EngineError):
    status, code = 422, "not_a_directory"


class IsADirectory(EngineError):
    status, code = 422, "is_a_directory"


class NotARegularFile(EngineError):
    status, code = 422, "not_a_regular_file"


class NoSpace(EngineError):
    status, code = 507, "not_enough_space"


class TooLarge(EngineError):
    status, code = 413, "file_too_large"


class TooManyEntries(EngineError):
    status, code = 422, "too_many_entries"


class Unsupported(EngineError):
    status, code = 422, "volume_unsupported"


class Corrupt(EngineError):
    status, code = 422, "volume_corrupt"


class ToolFailed(EngineError):
    status, code = 502, "volume_tool_failed"
