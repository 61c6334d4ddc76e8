"""The EdgeFleet edge agent: receives signed models, serves them locally, offloads hard inputs."""

__version__ = "0.1.0"
