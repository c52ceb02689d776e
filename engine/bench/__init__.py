"""Measurements (`make bench`, `make gpu-check`, `make bench-cluster`): never imported by serve."""
