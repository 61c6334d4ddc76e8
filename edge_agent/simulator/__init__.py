"""The fleet simulator's worker: many real agents in one process (`edge-agent simulate`)."""
