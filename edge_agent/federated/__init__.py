"""Federated learning on the device: the head trainer, the Flower ClientApp and the SuperNode
supervisor. Only ``client_app`` imports Flower (the ``edge-federated`` extra)."""
