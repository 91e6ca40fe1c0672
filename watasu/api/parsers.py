"""The control plane's one body parser: strict JSON, bounded, storable.

Beyond DRF's JSONParser (which already refuses the NaN/Infinity literals) a body is
refused (422 naming where) when it holds a number no field can take: one that overflows
a double to infinity (`1e400`) or an integer too long to read (thousands of digits);
and refused (400) when it nests deeper than
`MAX_DEPTH` (`[[[[...` would otherwise exhaust the interpreter's recursion), carries a
lone surrogate (`"\\ud800"` cannot be encoded as UTF-8, stored or rendered), or a NUL
character anywhere (PostgreSQL cannot store it in text or jsonb, and no name, command,
path or environment value may contain one). The size limit is Django's
DATA_UPLOAD_MAX_MEMORY_SIZE (RequestDataTooBig, answered 413).
"""

from __future__ import annotations

import json
import math
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.parsers import JSONParser

MAX_DEPTH = 32


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _OutOfRange:
    """Where the body held a number no field can take; refused by `check_json_value`."""

    def __init__(self, text: str) -> None:
        self.text = text


def _finite_float(text: str) -> float | _OutOfRange:
    value = float(text)
    return value if math.isfinite(value) else _OutOfRange(text)


def _int(text: str) -> int | _OutOfRange:
    try:
        return int(text)
    except ValueError:  # more digits than int() reads (sys.get_int_max_str_digits)
        return _OutOfRange(text)


def _where(path: str) -> str:
    return (path[:100] + "...") if len(path) > 100 else (path or "the body")


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        message = f"JSON parse error - {_where(path)} holds a lone surrogate (invalid Unicode)."
        raise ParseError(message) from exc
    if "\x00" in text:
        message = f"{_where(path)}: must not contain NUL characters."
        raise ValidationError([message])


def check_json_value(data: Any) -> None:
    """Depth, number, Unicode and NUL checks of a parsed value, without recursion."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, _OutOfRange):
            number = value.text[:40] + ("..." if len(value.text) > 40 else "")
            raise ValidationError([f"{_where(path)}: the number {number} is out of range."])
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise ParseError(f"JSON parse error - nested deeper than {MAX_DEPTH} levels.")
            if isinstance(value, dict):
                for key, item in value.items():
                    child = f"{path}.{key}" if path else str(key)
                    _check_text(key, child)
                    stack.append((item, child, depth + 1))
            else:
                stack.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value))


class StrictJSONParser(JSONParser):
    def parse(
        self, stream: Any, media_type: str | None = None, parser_context: dict[str, Any] | None = None
    ) -> Any:
        encoding = (parser_context or {}).get("encoding") or settings.DEFAULT_CHARSET
        try:
            text = stream.read().decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise ParseError(f"JSON parse error - the body is not valid {encoding} text.") from exc
        try:
            data = json.loads(
                text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_int
            )
        except RecursionError as exc:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_DEPTH} levels.") from exc
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from exc
        check_json_value(data)
        return data
