"""Rollouts: a model version taken to a labelled part of the fleet in waves (canary first),
advanced on health-checked ACTIVE reports, aborted and rolled back on failures; one engine
acts at a time (a Redis lease with fencing tokens), and every decision lives in SQL."""
