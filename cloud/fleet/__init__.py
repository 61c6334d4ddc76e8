"""The fleet service: the MQTT side of the control plane."""
