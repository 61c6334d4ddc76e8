"""Reference models built from data that packages ship (no hub downloads)."""
