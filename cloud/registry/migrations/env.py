"""Alembic environment: runs on the connection handed over by ``Database.migrate``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from cloud.registry.tables import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    # `alembic` CLI use: EDGEFLEET_DATABASE_URL or sqlalchemy.url in the ini file.
    from cloud.registry.database import normalize_url

    url = normalize_url(config.get_main_option("sqlalchemy.url") or "sqlite:///registry.db")
    with create_engine(url).begin() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
