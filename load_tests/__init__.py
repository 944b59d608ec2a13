"""Benchmarks (``make bench``) and locust load tests."""
