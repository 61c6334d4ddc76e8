"""JSON carried in a multipart form field, parsed into a schema with a clear 400."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from shared.errors import InvalidInput

__all__ = ["parse_json_field"]

S = TypeVar("S", bound=BaseModel)


def parse_json_field(raw: str | None, schema: type[S], *, field: str) -> S:
    """``raw`` (absent means ``{}``) as ``schema``; any problem is an InvalidInput naming it."""
    try:
        return schema.model_validate(json.loads(raw) if raw else {})
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{field} is not valid JSON: {exc.msg}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or field
        raise InvalidInput(f"invalid {field}: {where}: {first['msg']}") from exc
