"""Telemetry history: device windows rolled up per device per minute in SQL, and the
fleet-wide and per-device series read back from it, aggregated in the database."""
