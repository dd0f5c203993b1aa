"""A worker actor that can host either engine role and switch between them in place.

``RoleWorker`` wraps one :class:`~prefill_worker.worker.PrefillWorker` or
:class:`~decode_worker.worker.DecodeWorker` and forwards every call of either
kind to it, so the router and the pool manager use it exactly as they use
those. ``switch_role`` (only on a drained worker: nothing running, queued,
reserved or held) shuts the current role down and builds the other on the
same loaded model and measured peaks: the weights stay in memory and only the
engine (its KV cache, scheduler, stepping thread) and the KV transport are
new, so the transport's endpoint changes and the pool manager re-reads it.

The pool manager creates workers of this class when ``pools.autoscale`` lets
roles switch (both pools ask Ray for the same resources, or a switched actor
would hold the wrong ones). The two worker kinds stay unaware of each other;
only this layer (cluster) sees both.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from typing import Any

from decode_worker.worker import DecodeWorker
from prefill_worker.worker import PrefillWorker
from worker_common.worker_base import Preloaded
from worker_common.worker_config import DecodeEngineConfig, HandoffSettings, ModelConfig, PrefillEngineConfig

ROLE_CLASSES: dict[str, type] = {"prefill": PrefillWorker, "decode": DecodeWorker}


class RoleSwitchError(RuntimeError):
    """A switch that cannot happen now (the worker still holds work, or the role is unknown)."""


class WrongRoleError(RuntimeError):
    """A call of the other role (e.g. ``prefill`` on a worker that now decodes)."""


class RoleWorker:
    """Plain class; the pool manager wraps it with ``ray.remote``. Its actor name keeps the
    kind it started as; :meth:`role` (and ``status().kind``) say what it is now."""

    def __init__(self, worker_id: str, *, role: str, model: ModelConfig,
                 engines: Mapping[str, PrefillEngineConfig | DecodeEngineConfig], handoff: HandoffSettings) -> None:
        if set(engines) != set(ROLE_CLASSES) or role not in ROLE_CLASSES:
            raise RoleSwitchError(f"needs an engine config per role {sorted(ROLE_CLASSES)} and one of them as role; "
                                  f"got {sorted(engines)} and {role!r}")
        self.worker_id = worker_id
        self._model = model
        self._engines = dict(engines)
        self._handoff = handoff
        self.switches = 0
        self._role: Any = self._build(role, None)

    def _build(self, role: str, preloaded: Preloaded | None) -> Any:
        return ROLE_CLASSES[role](self.worker_id, model=self._model, engine=self._engines[role],
                                  handoff=self._handoff, preloaded=preloaded)

    def role(self) -> str:
        """The role this worker serves now: ``"prefill"`` or ``"decode"``."""
        return self._role.kind

    def switch_role(self, role: str) -> float:
        """Serve ``role`` from now on, keeping the loaded weights; returns the seconds the switch took.

        Refused (:class:`RoleSwitchError`) while the worker holds any request: drain it first
        (the pool manager takes it out of the routing table and waits until it is idle).
        """
        if role not in ROLE_CLASSES:
            raise RoleSwitchError(f"unknown role {role!r}; expected one of {sorted(ROLE_CLASSES)}")
        if role == self._role.kind:
            return 0.0
        status = self._role.status()
        if status.busy:
            raise RoleSwitchError(f"{self.worker_id} is not drained (running {status.running}, waiting "
                                  f"{status.waiting}, reserved {status.reserved}, held {status.held}, "
                                  f"outstanding tokens {status.outstanding_tokens})")
        t0 = time.perf_counter()
        old = self._role
        old.shutdown()
        self._role = self._build(role, old.preloaded)
        self.switches += 1
        return time.perf_counter() - t0


def _forward(name: str, fn: Any) -> Any:
    """A method of :class:`RoleWorker` that calls ``name`` on the current role (same calling style:
    plain, coroutine or async generator, so Ray streams what the role streams)."""

    def target(self: RoleWorker) -> Any:
        try:
            return getattr(self._role, name)
        except AttributeError:
            raise WrongRoleError(f"{self.worker_id} serves {self._role.kind} now; it has no {name}()") from None

    if inspect.isasyncgenfunction(fn):
        async def method(self, *args, **kwargs):
            async for item in target(self)(*args, **kwargs):
                yield item
    elif inspect.iscoroutinefunction(fn):
        async def method(self, *args, **kwargs):
            return await target(self)(*args, **kwargs)
    else:
        def method(self, *args, **kwargs):
            return target(self)(*args, **kwargs)
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"The current role's ``{name}``."
    return method


# Every public method of either role, forwarded: one list, derived from the classes themselves.
FORWARDED = sorted({n for cls in ROLE_CLASSES.values() for n, f in inspect.getmembers(cls, inspect.isfunction)
                    if not n.startswith("_")} - set(vars(RoleWorker)))
for _name in FORWARDED:
    _fn = next(getattr(cls, _name) for cls in ROLE_CLASSES.values() if hasattr(cls, _name))
    setattr(RoleWorker, _name, _forward(_name, _fn))
