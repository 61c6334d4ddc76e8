"""Integers bounded to what the registry's columns hold, for path, query and body fields.

A number the database cannot bind (SQLite stops at int64, PostgreSQL's ``integer`` at
int32) is refused by validation with a 422 naming the field, before it reaches SQL.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

__all__ = ["INT32_MAX", "INT64_MAX", "DbBigInt", "DbInt", "VersionNumber"]

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# An ``Integer`` column (PostgreSQL int4).
DbInt = Annotated[int, Field(ge=-INT32_MAX - 1, le=INT32_MAX)]
# A ``BigInteger`` column (int8).
DbBigInt = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
# ``model_versions.version``: numbered from 1.
VersionNumber = Annotated[int, Field(ge=1, le=INT32_MAX)]
