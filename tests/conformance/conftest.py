"""Conformance: the emulators driven by the providers' official clients over real loopback
sockets, asserting what those clients parsed. Each provider's fixtures live beside its tests
(test_replicate_client.py; fal_tls.py for fal), so the two suites share nothing but this."""
