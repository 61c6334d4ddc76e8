"""`edgefleet demo`: the cloud in dev mode, the reference models and local edge agents."""
