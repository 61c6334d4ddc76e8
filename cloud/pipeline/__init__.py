"""The model pipeline: inspect, export, quantize, gate, calibrate, register."""
