"""Federated incremental learning with Flower: the SuperLink the cloud runs, the ServerApp
and its rounds, and the coordinator that turns a run's result into a gated new version."""
