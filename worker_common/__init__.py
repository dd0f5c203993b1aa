"""What the prefill and decode workers share, and what the router speaks to them.

Owns the worker base class, the typed router<->worker messages (KV hand-off metadata included), worker
settings and the transfer wait. May import engine and kvtransfer only; workers and the router import it.
"""
