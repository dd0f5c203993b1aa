"""Settings of the shared-memory path: the one source of their names, defaults and limits.

Torch-free, so the config model (:mod:`cluster.config`) and the worker
settings can name them without importing a transport.
"""

# kvtransfer.same_node: how a pair of workers on one node moves KV.
#   "shm": through shared memory (kvtransfer.shm_transport); pairs on different nodes use `backend`.
#   "backend": like any other pair, through `backend`.
SAME_NODE_MODES = ("shm", "backend")
DEFAULT_SAME_NODE = "shm"

# The receiver keeps pre-faulted shared-memory buffers for reuse, up to this many bytes in all
# (a transfer that finds none free and no room gets a one-off buffer, freed after use).
DEFAULT_SHM_POOL_BYTES = 256 << 20
MAX_SHM_POOL_BYTES = 64 << 30
