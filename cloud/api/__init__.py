"""The cloud REST API: admin, device and (later) inference endpoints."""
