"""Bounds on the gRPC backend's push streams: the one source of their defaults and limits.

Torch-free, so the config model (:mod:`cluster.config`) and the worker
settings can name them without importing a transport.
"""

DEFAULT_STREAM_IDLE_S = 10.0  # a push stream that sends nothing for this long is closed
MAX_STREAM_IDLE_S = 600.0  # the largest idle bound a config may set
DEFAULT_MAX_STREAMS_PER_PEER = 64  # open push streams one sender may hold on one receiver
MAX_STREAMS_PER_PEER = 1024  # the largest per-sender bound a config may set (and the server's total)
