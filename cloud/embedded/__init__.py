"""Embedded defaults: a real MQTT broker and a real Redis as child processes."""
