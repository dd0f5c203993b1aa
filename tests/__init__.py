"""Tests of every package (one folder each), tests/integration on a real local Ray cluster,
the KV transport conformance suite and the correctness reference (tests/reference.py).
May import any package; no package imports tests."""
