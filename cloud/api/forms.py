"""JSON carried in a multipart form field, parsed into a schema with a clear 400."""

from __future__ import annotations

import json
import math
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from shared.errors import InvalidInput

__all__ = ["parse_json_field"]

S = TypeVar("S", bound=BaseModel)


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise InvalidInput(f"{text[:20]} is not a finite number")
    return number


def _constant(name: str) -> float:
    # Python's json reads NaN and Infinity, which are not JSON and which PostgreSQL refuses.
    raise InvalidInput(f"{name} is not JSON")


def parse_json_field(raw: str | None, schema: type[S], *, field: str) -> S:
    """``raw`` (absent means ``{}``) as ``schema``; any problem is an InvalidInput naming it."""
    try:
        value = json.loads(raw, parse_float=_finite, parse_constant=_constant) if raw else {}
        return schema.model_validate(value)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{field} is not valid JSON: {exc.msg}") from exc
    except InvalidInput as exc:
        raise InvalidInput(f"{field} is not valid JSON: {exc.message}") from exc
    except RecursionError as exc:
        raise InvalidInput(f"{field} is nested too deeply") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or field
        raise InvalidInput(f"invalid {field}: {where}: {first['msg']}") from exc
