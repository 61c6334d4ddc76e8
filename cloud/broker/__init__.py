"""Broker logins: what the cloud and each device may do on Mosquitto, and who provisions it."""
