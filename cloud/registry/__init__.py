"""The registry: SQLAlchemy tables, Alembic migrations and keyword-only data functions."""
