"""Fault injection for transports: a constructor argument, never a global.

Every backend takes ``faults: TransferFaults | None``. The faults act on the
*sending* side, where a real deployment loses transfers (a crashed prefill
worker, a congested link, a dead peer):

- ``fail_first_n``: the first n ``send`` calls of this transport fail at once
  (FAILED before any byte moves), as when the peer cannot be reached.
- ``delay_s``: each send sleeps this long before it starts (a slow link or a
  busy sender); an abort or the deadline still ends the sleep early.
- ``drop`` (every send) / ``drop_first_n`` (the first n sends): the sender
  goes through the motions but the payload never arrives and no
  acknowledgement comes back: the receiver times out and so does the sender
  (both end FAILED by their deadlines). Where a backend keeps a connection
  per peer, the drop happens after the transfer was committed on it, so it
  also exercises the recovery of that connection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class TransferFaults:
    """What to break on the sending side of one transport (see module doc)."""

    fail_first_n: int = 0
    delay_s: float = 0.0
    drop: bool = False
    drop_first_n: int = 0

    def __post_init__(self) -> None:
        if self.fail_first_n < 0 or self.delay_s < 0 or self.drop_first_n < 0:
            raise ValueError(f"fault counts and delays must be >= 0: {self}")


class FaultInjector:
    """The mutable side of :class:`TransferFaults`: counts sends so far.

    Kept apart from the frozen dataclass so a ``TransferFaults`` can be shared
    (or shipped to a Ray actor) without carrying one transport's counter.
    """

    def __init__(self, faults: TransferFaults | None) -> None:
        self.faults = faults or TransferFaults()
        self._sends = 0
        self._lock = threading.Lock()

    def begin_send(self) -> tuple[str | None, bool]:
        """Count one send: (why it must fail or None, whether its payload is dropped)."""
        with self._lock:
            self._sends += 1
            n = self._sends
        f = self.faults
        if n <= f.fail_first_n:
            return f"injected fault: send {n} of the first {f.fail_first_n} fails", False
        return None, f.drop or n - f.fail_first_n <= f.drop_first_n

    @property
    def delay_s(self) -> float:
        return self.faults.delay_s
