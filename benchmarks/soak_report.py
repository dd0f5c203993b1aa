"""Accounting and report of ``benchmarks.soak``: how each request ended, leaked KV blocks, RSS growth.

Kept apart from the runner (which starts the cluster, drives the traffic and
kills a worker) so that each module has one job: this one turns the request
records, the final ClusterStatus and the RSS samples into the report, its
exit status and its text, and is unit-tested without a cluster.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

OUTCOMES = ("completed", "failed", "cancelled", "lost")
REQUIRED_KEYS = ("completed", "failed", "lost", "leaked_blocks", "rss_growth_mb")


# ------------------------------------------------------------------ records
@dataclass
class Record:
    """What happened to one request, as this client saw it (times in s from the run's start)."""

    index: int
    kind: str                          # "raw" | "chat" | "invalid:<what>" | "warmup" | "post"
    request_id: str = ""
    deadline_s: float | None = None    # the gRPC deadline given, if any
    cancel_after_s: float | None = None  # planned client cancel, if any
    sent_at: float = 0.0
    ended_at: float | None = None
    first_token_at: float | None = None
    finish_reason: str | None = None   # "stop" | "length" | "abort" when the stream finished
    status: str | None = None          # gRPC status code name when the call ended in error
    details: str = ""
    tokens: int = 0
    max_tokens: int | None = None
    attempts: int = 0                  # the router's Timings.attempts (retries after a worker death)
    prefill_worker: str = ""           # the workers that served it (the last attempt's), from Timings
    decode_worker: str = ""
    cancel_sent: bool = False          # this client cancelled the call before it ended
    hung: bool = False                 # still open at deadline + margin (or the hang bound)
    during_kill: bool = False          # in flight when the worker was killed
    during_router_kill: bool = False   # in flight when a router replica was killed
    client_retries: int = 0            # calls sent again after UNAVAILABLE before any response (a dead router)


def classify(r: Record) -> str:
    """completed / cancelled / failed / lost (see the module docstring)."""
    if r.hung:
        return "lost"
    if r.finish_reason:
        return "completed"
    if r.cancel_sent and r.status in (None, "CANCELLED"):
        return "cancelled"
    if r.status:
        return "failed"
    return "lost"  # the stream ended with neither a finish_reason nor an error status


def tally(records: Iterable[Record]) -> dict[str, Any]:
    """Counts per outcome, failures by status code, and the oddities worth a look."""
    records = list(records)
    out: dict[str, Any] = {k: 0 for k in OUTCOMES}
    failed_by_status: Counter[str] = Counter()
    finish: Counter[str] = Counter()
    lost_ids: list[str] = []
    invalid_accepted: list[str] = []   # an invalid request that was not refused with INVALID_ARGUMENT
    for r in records:
        c = classify(r)
        out[c] += 1
        if c == "failed":
            failed_by_status[r.status or "?"] += 1
        elif c == "completed":
            finish[r.finish_reason or "?"] += 1
        elif c == "lost":
            lost_ids.append(r.request_id or f"#{r.index}")
        if r.kind.startswith("invalid") and not (c == "failed" and r.status == "INVALID_ARGUMENT") \
                and not (c == "cancelled"):
            invalid_accepted.append(r.request_id or f"#{r.index}")
    out["requests"] = len(records)
    out["failed_by_status"] = dict(sorted(failed_by_status.items()))
    out["finish_reasons"] = dict(sorted(finish.items()))
    out["lost_request_ids"] = lost_ids
    out["invalid_not_refused"] = invalid_accepted
    out["retried"] = sum(1 for r in records if classify(r) == "completed" and r.attempts > 1)
    out["short_completions"] = sum(  # finished "length" with fewer tokens than asked: a resume that lost tokens?
        1 for r in records if r.finish_reason == "length" and r.max_tokens and r.tokens != r.max_tokens)
    return out


# ------------------------------------------------------------- KV leak check
def worker_blocks(status: Any) -> list[dict[str, Any]]:
    """Per-worker block counts from a ``ClusterStatusResponse`` (or anything shaped like it)."""
    rows = []
    for pool in status.pools:
        for w in pool.workers:
            rows.append({"worker_id": w.worker_id, "kind": pool.kind, "alive": bool(w.alive),
                         "used_blocks": int(w.used_blocks), "free_blocks": int(w.free_blocks),
                         "num_blocks": int(w.num_blocks), "running": int(w.running), "waiting": int(w.waiting)})
    return rows


def leaked_by_worker(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Blocks still taken on each worker: ``max(used_blocks, num_blocks - free_blocks)``."""
    return {r["worker_id"]: max(int(r["used_blocks"]), int(r["num_blocks"]) - int(r["free_blocks"]), 0)
            for r in rows}


def leaked_blocks(rows: Iterable[Mapping[str, Any]]) -> int:
    return sum(leaked_by_worker(rows).values())


@dataclass
class ProcSample:
    label: str
    pid: int
    start_mb: float | None = None
    end_mb: float | None = None
    note: str = ""


def rss_growth(samples: Iterable[ProcSample], replaced: Mapping[str, str]) -> dict[str, float | str | None]:
    """Per process: end - start in MB (rounded); ``"replaced by X"`` for a killed worker."""
    out: dict[str, float | str | None] = {}
    for s in samples:
        if s.label in replaced:
            out[s.label] = f"replaced by {replaced[s.label]}"
        elif s.start_mb is None or s.end_mb is None:
            out[s.label] = None
        else:
            out[s.label] = round(s.end_mb - s.start_mb, 1)
    return out


# ------------------------------------------------------------------- report
def build_report(records: list[Record], blocks_end: list[dict[str, Any]], samples: list[ProcSample],
                 kill: dict[str, Any], **extra: Any) -> dict[str, Any]:
    counts = tally(records)
    replaced = {kill["worker_id"]: kill.get("replacement_id") or "?"} if kill.get("worker_id") else {}
    router_kill = extra.get("router_kill") or {}
    if router_kill.get("replica"):
        replaced[router_kill["replica"]] = f"{router_kill['replica']}#2"
    report = {
        "completed": counts["completed"],
        "failed": counts["failed"],
        "lost": counts["lost"],
        "leaked_blocks": leaked_blocks(blocks_end),
        "rss_growth_mb": rss_growth(samples, replaced),
        "cancelled": counts["cancelled"],
        "requests": counts["requests"],
        "failed_by_status": counts["failed_by_status"],
        "finish_reasons": counts["finish_reasons"],
        "retried": counts["retried"],
        "short_completions": counts["short_completions"],
        "lost_request_ids": counts["lost_request_ids"],
        "invalid_not_refused": counts["invalid_not_refused"],
        "leaked_by_worker": leaked_by_worker(blocks_end),
        "blocks_end": blocks_end,
        "rss_mb": {s.label: {"pid": s.pid, "start": _r(s.start_mb), "end": _r(s.end_mb), "note": s.note}
                   for s in samples},
        "kill": kill,
    }
    report.update(extra)
    return report


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def exit_code(report: Mapping[str, Any]) -> int:
    bad = report["lost"] > 0 or report["leaked_blocks"] > 0
    kill = report.get("kill") or {}
    if kill.get("requested") and not kill.get("back_to_size_s"):
        bad = True  # the worker was not killed or not replaced
    manager = report.get("manager_kill") or {}
    if manager.get("requested") and not manager.get("back_s"):
        bad = True  # the pool manager was not killed or did not come back
    router = report.get("router_kill") or {}
    if router.get("requested") and not router.get("back_s"):
        bad = True  # the router replica was not killed or did not come back
    return 1 if bad else 0


def render(report: Mapping[str, Any]) -> str:
    lines = [f"soak: {report.get('duration_s', '?')} s of traffic (+{report.get('drain_s', '?')} s until the last "
             f"ended), {report['requests']} requests "
             f"(model {report.get('model', '?')}, {report.get('pools', '?')})",
             f"  completed {report['completed']}  (finish: {report['finish_reasons']}; "
             f"{report['retried']} took more than one attempt)",
             f"  failed    {report['failed']}  (by status: {report['failed_by_status'] or '-'})",
             f"  cancelled {report['cancelled']}  (by this client)",
             f"  lost      {report['lost']}" + (f"  {report['lost_request_ids'][:10]}" if report["lost"] else "")
             + ("   OK" if report["lost"] == 0 else "   <-- must be 0")]
    if report["invalid_not_refused"]:
        lines.append(f"  invalid requests not refused with INVALID_ARGUMENT: {report['invalid_not_refused']}")
    if report["short_completions"]:
        lines.append(f"  'length' finishes with fewer tokens than max_tokens: {report['short_completions']}")
    lines.append(f"  leaked KV blocks {report['leaked_blocks']} after {report.get('settle_s', '?')} s settle "
                 f"{report['leaked_by_worker']}" + ("   OK" if report["leaked_blocks"] == 0 else "   <-- must be 0"))
    k = report.get("kill") or {}
    if k.get("worker_id"):
        lines.append(f"  kill: {k['worker_id']} (pid {k.get('pid')}) at t={k.get('at_s')} s, "
                     f"{k.get('inflight_at_kill')} requests in flight; replaced by {k.get('replacement_id')}, "
                     f"pool back to size after {k.get('back_to_size_s')} s")
    elif k.get("requested"):
        lines.append(f"  kill: NOT DONE ({k.get('error', 'unknown')})")
    m = report.get("manager_kill") or {}
    if m.get("back_s"):
        lines.append(f"  pool manager kill: pid {m.get('pid')} at t={m.get('at_s')} s, {m.get('inflight_at_kill')} "
                     f"requests in flight; back after {m['back_s']} s, adopting {len(m.get('adopted', []))} of "
                     f"{len(m.get('workers_before', []))} workers")
    elif m.get("requested"):
        lines.append(f"  pool manager kill: NOT DONE ({m.get('error', 'unknown')})")
    rk = report.get("router_kill") or {}
    if rk.get("back_s"):
        lines.append(f"  router kill: {rk.get('replica')} (pid {rk.get('pid')}) at t={rk.get('at_s')} s carrying "
                     f"{rk.get('carried')} requests (others: {rk.get('others_inflight')}); restarted after "
                     f"{rk['back_s']} s; in flight then: {report.get('inflight_at_router_kill_outcomes')}; "
                     f"{report.get('client_retries', 0)} calls retried by the client")
    elif rk.get("requested"):
        lines.append(f"  router kill: NOT DONE ({rk.get('error', 'unknown')})")
    lines.append("  RSS (MB, after warm-up -> end, growth):")
    for label, row in report["rss_mb"].items():
        g = report["rss_growth_mb"].get(label)
        g = f"{g:+.1f}" if isinstance(g, (int, float)) else g
        lines.append(f"    {label:<14} pid {row['pid']:<8} {row['start']} -> {row['end']}  {g}"
                     + (f"  ({row['note']})" if row["note"] else ""))
    return "\n".join(lines)
