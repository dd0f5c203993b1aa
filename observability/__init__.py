"""What the cluster measures and how it is shown: request stages, Prometheus metrics, the Grafana dashboard.

Owns the ``Stage`` enum and the one computation of stage durations, the metric names and collectors, and the
dashboard generator. May import ``protos``, ``analysis``, ``engine``, ``kvtransfer`` and ``worker_common``; never
the workers, the router, ``cluster`` or ``benchmarks``.
"""
