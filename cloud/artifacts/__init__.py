"""Content-addressed artifact files and their chunk index."""
