"""Helpers shared by the cluster benchmarks: progress logging, one local Ray
cluster owned by the benchmark process, and how busy the shared machine is.

1. :func:`start_ray` starts a fresh local Ray cluster (``ray.init(address="local")``,
   127.0.0.1, token auth) whose every process descends from this one, so that
   ``ray.shutdown()`` ends exactly it, never another session's cluster.
2. :func:`busy_cores` is a one-shot probe of the whole machine's CPU use.
3. :class:`CpuSampler` samples, in a background thread, the machine's CPU use
   and that of this process *and all its descendants* (the Ray workers
   included), so that a phase of a benchmark can report how many cores'
   worth of CPU *other* processes took meanwhile, and the load average.
"""

from __future__ import annotations

from cluster.local_ray import apply_ray_env

# Ray reads its environment when it is imported: token auth and loopback only, set before any import of ray.
apply_ray_env()

import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402


BUSY_WARN_CORES = 0.25  # other processes' CPU (cores) above which figures are flagged as noisy


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have used so far (:func:`benchmarks.engine.busy_cpu_seconds`).

    Imported on first use: ``benchmarks.engine`` pulls in torch and the model
    loader, which the pure parts of the benchmarks (and their tests) do without.
    """
    from benchmarks.engine import busy_cpu_seconds as machine_busy

    return machine_busy()


def log(msg: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def busy_cores(probe_s: float = 1.0) -> float | None:
    """How many cores' worth of CPU the whole machine used over ``probe_s`` (``/proc/stat``)."""

    a = busy_cpu_seconds()
    time.sleep(probe_s)
    b = busy_cpu_seconds()
    return None if a is None or b is None else round((b - a) / probe_s, 2)


def start_ray(namespace: str, num_cpus: int = 2) -> None:
    """A fresh local Ray cluster owned by this process (``ray.shutdown()`` ends exactly it).

    ``ray.init(address="local")`` makes every Ray process a descendant of
    this one, so the benchmark's CPU sampling counts them as its own and
    its end ends them; :func:`cluster.local_ray.start_head` (a separate
    ``ray start`` head) is for processes that must outlive or share a cluster.
    """
    from cluster.local_ray import init_private_cluster

    init_private_cluster(namespace, num_cpus, logging_level="WARNING")


# ------------------------------------------------------------------ contention
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[int, tuple[int, float]]:
    """``pid -> (ppid, cpu seconds so far)`` of every process (``/proc/<pid>/stat``)."""
    out: dict[int, tuple[int, float]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = text[text.rfind(")") + 2:].split()
        try:
            out[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK)
        except (IndexError, ValueError):
            continue
    return out


def tree_cpu_seconds(root: int | None = None) -> dict[int, float]:
    """CPU seconds used so far by ``root`` (default: this process) and each of its descendants, by pid."""
    root = os.getpid() if root is None else root
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, float] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in table and pid not in out:
            out[pid] = table[pid][1]
            stack.extend(children.get(pid, ()))
    return out


@dataclass(frozen=True)
class CpuSample:
    """One interval of :class:`CpuSampler`: machine and own-tree CPU seconds used, and the 1-min load average."""

    t0: float
    t1: float
    machine_s: float
    own_s: float
    loadavg_1m: float


class CpuSampler:
    """Background sampling of other processes' CPU use (machine - this process tree).

    A descendant that exits between two samples loses its last interval's CPU
    to "other"; benchmarks start and stop clusters between phases, not in them.
    ``window(t0, t1)`` summarizes the intervals inside ``[t0, t1]``
    (``time.perf_counter()``).
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.samples: list[CpuSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        t_prev, m_prev, tree_prev = time.perf_counter(), busy_cpu_seconds(), tree_cpu_seconds()
        while not self._stop.wait(self.interval_s):
            t, m, tree = time.perf_counter(), busy_cpu_seconds(), tree_cpu_seconds()
            if m is None or m_prev is None:
                return  # no /proc/stat here
            own = sum(cpu - tree_prev.get(pid, 0.0) for pid, cpu in tree.items())
            self.samples.append(CpuSample(t_prev, t, m - m_prev, own, os.getloadavg()[0]))
            t_prev, m_prev, tree_prev = t, m, tree

    def window(self, t0: float, t1: float) -> dict[str, float | None]:
        """``other_cores`` (mean cores of CPU other processes used), ``own_cores``,
        ``loadavg_1m`` (max over the window) for the samples inside ``[t0, t1]``."""
        inside = [s for s in self.samples if s.t0 >= t0 - 0.5 * self.interval_s and s.t1 <= t1 + 0.5 * self.interval_s]
        if not inside:
            return {"other_cores": None, "own_cores": None, "loadavg_1m": None}
        span = sum(s.t1 - s.t0 for s in inside)
        machine, own = sum(s.machine_s for s in inside), sum(s.own_s for s in inside)
        return {"other_cores": round(max(0.0, machine - own) / span, 2), "own_cores": round(own / span, 2),
                "loadavg_1m": round(max(s.loadavg_1m for s in inside), 2)}
