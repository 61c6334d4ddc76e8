"""A simulated fleet of real agents against a running cloud (`edgefleet simulate`)."""
