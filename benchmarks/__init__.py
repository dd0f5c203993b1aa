"""Load generators, workloads, SLO and goodput maths, and the reports that measure the
engine and the cluster (they measure, they do not assert; see benchmarks/README.md).
The top layer: may import every package but tests."""
