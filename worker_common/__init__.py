"""What the prefill and decode workers share, and the values they hand to the router and the pool manager.

Owns the worker base class, the typed router<->worker messages (KV hand-off metadata included), worker
settings, the transfer wait, the worker's status report (WorkerStatus) and the cancel-safe bounded await (`within`).
May import ``protos``, ``analysis``, ``engine`` and ``kvtransfer``; never the workers, ``observability`` or above.
"""
