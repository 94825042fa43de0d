"""Reliability drills: the gateway under provider faults, Redis loss and replica death,
measured as requests lost, double charges and latency (`make reliability`)."""
