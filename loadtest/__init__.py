"""Locust load tests of the public gRPC API (run with `make load` or loadtest/run.py)."""
