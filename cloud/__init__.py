"""The EdgeFleet cloud control plane: registry, artifacts, fleet service, APIs."""
