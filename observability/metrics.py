"""Prometheus metrics: the router's request timings and every worker's load.

Everything registers on a :class:`~prometheus_client.CollectorRegistry`
passed in explicitly (never the global one), so several deployments and
tests can live in one process. Two halves:

1. :class:`RouterMetrics`: histograms of TTFT, TPOT, ITL, E2E and of each
   request stage, counters of requests by outcome and of tokens, a gauge of
   requests in flight. The router calls it with plain numbers.
2. :class:`WorkerStatusCollector`: a custom collector that turns the
   :class:`~worker_common.worker_status.WorkerStatus` values the router
   polls from its workers into per-worker gauges and counters (labels
   ``worker_id`` and ``kind``) at scrape time, through one table,
   :data:`WORKER_METRICS`, of metric name, type, help and status attribute.

The metric names are module constants; ``observability.dashboard`` builds the
Grafana dashboard from the same constants, so the two cannot drift apart.
Names follow the Prometheus conventions: a ``splitserve_`` prefix, base
units (seconds, bytes) in the name, ``_total`` on counters, ``_ratio`` on
fractions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from operator import attrgetter
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from observability.autoscale import AutoscaleReport
from observability.stages import Stage
from worker_common.worker_status import WorkerStatus

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ router
TTFT = "splitserve_time_to_first_token_seconds"
TPOT = "splitserve_time_per_output_token_seconds"
ITL = "splitserve_inter_token_latency_seconds"
E2E = "splitserve_e2e_request_latency_seconds"
STAGE = "splitserve_request_stage_seconds"  # label stage: a Stage's value
REQUESTS = "splitserve_requests_total"
PROMPT_TOKENS = "splitserve_prompt_tokens_total"
GENERATION_TOKENS = "splitserve_generation_tokens_total"
IN_FLIGHT = "splitserve_requests_in_flight"

ROUTER_HISTOGRAMS = (TTFT, TPOT, ITL, E2E, STAGE)

#: How a request ended. ``rejected``: refused at admission (queues full);
#: ``invalid``: bad input; ``deadline``: the client's deadline passed.
OUTCOMES = ("ok", "cancelled", "deadline", "error", "rejected", "invalid")

#: Whole-request and per-stage latencies: 1 ms to 5 minutes.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
#: Per-token gaps: 0.5 ms to 30 s (a preempted or stalled stream).
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15,
                 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouterMetrics:
    """The router's request metrics on ``registry``.

    Call :meth:`observe_request` once per request that reached a worker,
    :meth:`observe_token_gap` for each gap between two streamed tokens, and
    :meth:`count_outcome` alone for requests that ended before any timing
    (rejected, invalid). Wrap each request in :meth:`track_in_flight`.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ttft = Histogram(TTFT, "Time from the router receiving a request to its first token leaving it.",
                              buckets=REQUEST_BUCKETS, registry=registry)
        self.tpot = Histogram(TPOT, "Mean time per output token after the first, per request.",
                              buckets=TOKEN_BUCKETS, registry=registry)
        self.itl = Histogram(ITL, "Gap between two consecutive tokens of one stream.",
                             buckets=TOKEN_BUCKETS, registry=registry)
        self.e2e = Histogram(E2E, "Whole request, router receipt to last token, of successful requests.",
                             buckets=REQUEST_BUCKETS, registry=registry)
        self.stage = Histogram(STAGE, "Time a request spent in each stage of its lifecycle.", ["stage"],
                               buckets=REQUEST_BUCKETS, registry=registry)
        self.requests = Counter(REQUESTS, "Requests by how they ended.", ["outcome"], registry=registry)
        self.prompt_tokens = Counter(PROMPT_TOKENS, "Prompt tokens of requests that reached a worker.",
                                     registry=registry)
        self.generation_tokens = Counter(GENERATION_TOKENS, "Tokens streamed to clients.", registry=registry)
        self.in_flight = Gauge(IN_FLIGHT, "Requests admitted and not yet finished.", registry=registry)
        # Known label values start at 0, so rate() sees the first request.
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        for stage in Stage:
            self.stage.labels(stage=stage.value)

    def track_in_flight(self):
        """Context manager (or decorator) counting the request in flight while it runs."""
        return self.in_flight.track_inprogress()

    def count_outcome(self, outcome: str) -> None:
        """Count one finished request; ``outcome`` is one of :data:`OUTCOMES`."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
        self.requests.labels(outcome=outcome).inc()

    def observe_request(
        self,
        outcome: str,
        *,
        num_prompt_tokens: int,
        num_output_tokens: int,
        ttft_s: float | None = None,
        e2e_s: float | None = None,
        stages: Mapping[Stage, float] | None = None,
    ) -> None:
        """Record one finished request.

        Counts the outcome and the tokens; observes TTFT when there was a
        first token, and — for ``ok`` requests only, as a cancelled request's
        duration is the client's choice — E2E and TPOT (``(e2e - ttft) /
        (num_output_tokens - 1)``, when there were at least two tokens).
        ``stages`` maps each :class:`~observability.stages.Stage` the request
        reached to its seconds (:func:`~observability.stages.stage_seconds`);
        the stages it never reached are simply left out.
        """
        self.count_outcome(outcome)
        for stage in stages or {}:
            if not isinstance(stage, Stage):
                raise ValueError(f"unknown stage {stage!r}; expected a Stage: {[s.value for s in Stage]}")
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if outcome == "ok" and e2e_s is not None:
            self.e2e.observe(e2e_s)
            if ttft_s is not None and num_output_tokens > 1:
                self.tpot.observe((e2e_s - ttft_s) / (num_output_tokens - 1))
        for stage, seconds in (stages or {}).items():
            self.stage.labels(stage=stage.value).observe(seconds)

    def observe_token_gap(self, seconds: float) -> None:
        """One inter-token latency: the gap between two consecutive tokens of a stream."""
        self.itl.observe(seconds)


# ------------------------------------------------------------------ workers
WORKER_LABELS = ("worker_id", "kind")

W_WAITING = "splitserve_worker_waiting_sequences"
W_RUNNING = "splitserve_worker_running_sequences"
W_RESERVED = "splitserve_worker_reserved_sequences"
W_OUTSTANDING = "splitserve_worker_outstanding_tokens"
W_KV_BLOCKS = "splitserve_worker_kv_cache_blocks"  # label state=used|free
W_KV_CAPACITY = "splitserve_worker_kv_cache_capacity_blocks"
W_SERVED = "splitserve_worker_requests_served_total"
W_PREFILLS = "splitserve_worker_prefills_total"
W_KV_IMPORTS = "splitserve_worker_kv_imports_total"
W_FORKS = "splitserve_worker_forked_samples_total"
W_BATCH = "splitserve_worker_batch_size"
W_MBU = "splitserve_worker_model_bandwidth_utilization_ratio"
W_MFU = "splitserve_worker_model_flops_utilization_ratio"
W_STEPS = "splitserve_worker_steps_total"
W_BUSY = "splitserve_worker_busy_seconds_total"
W_TOKENS = "splitserve_worker_computed_tokens_total"  # label phase=prefill|decode
W_MODEL_BYTES = "splitserve_worker_model_memory_bytes_total"
W_MODEL_FLOPS = "splitserve_worker_model_flops_total"
W_PEAK_BW = "splitserve_worker_peak_memory_bandwidth_bytes_per_second"
W_PEAK_FLOPS = "splitserve_worker_peak_flops_per_second"
W_XFER_BYTES = "splitserve_worker_kv_transfer_bytes_total"  # label direction=sent|received
W_XFER_CHUNKS = "splitserve_worker_kv_transfer_chunks_total"
W_XFER_SECONDS = "splitserve_worker_kv_transfer_seconds_total"  # label direction=sent
W_XFER_REFUSED = "splitserve_worker_kv_transfer_refused_unauthenticated_total"
W_CACHED_BLOCKS = "splitserve_worker_prefix_cache_blocks"  # free blocks that hold a cached prefix
W_PREFIX_QUERIED = "splitserve_worker_prefix_cache_queried_tokens_total"
W_PREFIX_HIT = "splitserve_worker_prefix_cache_hit_tokens_total"
W_PREFIX_HIT_RATIO = "splitserve_worker_prefix_cache_hit_ratio"
W_EVICTIONS = "splitserve_worker_prefix_cache_evictions_total"

_GAUGE, _COUNTER = "gauge", "counter"


@dataclass(frozen=True)
class WorkerMetric:
    """One per-worker metric and where its value lives in a :class:`WorkerStatus`.

    ``series`` pairs a value of the ``label`` (``None`` when the metric has
    no label beyond :data:`WORKER_LABELS`) with an attribute path of the
    status (dotted for the nested ``step_stats`` and ``kv_transfer``).
    """

    name: str
    type: str  # "gauge" | "counter"
    help: str
    series: tuple[tuple[str | None, str], ...]
    label: str | None = None


def _one(name: str, kind: str, doc: str, attribute: str) -> WorkerMetric:
    return WorkerMetric(name, kind, doc, ((None, attribute),))


#: Every per-worker metric, in the order they are exposed: the one table the collector iterates over.
WORKER_METRICS: tuple[WorkerMetric, ...] = (
    _one(W_WAITING, _GAUGE, "Sequences queued in the worker's engine.", "waiting"),
    _one(W_RUNNING, _GAUGE, "Sequences in the running batch.", "running"),
    _one(W_RESERVED, _GAUGE, "KV reservations awaiting their transfer.", "reserved"),
    _one(W_OUTSTANDING, _GAUGE, "Tokens of requests accepted and not finished.", "outstanding_tokens"),
    WorkerMetric(W_KV_BLOCKS, _GAUGE, "KV cache blocks by state.",
                 (("used", "used_blocks"), ("free", "free_blocks")), "state"),
    _one(W_KV_CAPACITY, _GAUGE, "KV cache blocks in all.", "num_blocks"),
    _one(W_SERVED, _COUNTER, "Requests this worker finished.", "requests_served"),
    _one(W_PREFILLS, _COUNTER, "Prompts prefilled by a prefill worker (a request with n samples counts once).",
         "prefills"),
    _one(W_KV_IMPORTS, _COUNTER, "Prefilled KVs a decode worker imported (a request with n samples counts once).",
         "kv_imports"),
    _one(W_FORKS, _COUNTER, "Samples forked from a prompt already in KV, sharing its blocks (n - 1 per request "
         "with n samples).", "forks"),
    _one(W_BATCH, _GAUGE, "Mean sequences per engine step over the recent window.", "step_stats.recent_batch_size"),
    _one(W_MBU, _GAUGE, "Model bandwidth utilization over the recent window: modelled bytes / busy time / peak.",
         "step_stats.recent_mbu"),
    _one(W_MFU, _GAUGE, "Model FLOPs utilization over the recent window: modelled FLOPs / busy time / peak.",
         "step_stats.recent_mfu"),
    _one(W_STEPS, _COUNTER, "Engine steps run.", "step_stats.steps"),
    _one(W_BUSY, _COUNTER, "Seconds spent inside engine steps.", "step_stats.busy_seconds"),
    WorkerMetric(W_TOKENS, _COUNTER, "Tokens the model computed, by phase (recompute after preemption included).",
                 (("prefill", "step_stats.prefill_tokens"), ("decode", "step_stats.decode_tokens")), "phase"),
    _one(W_MODEL_BYTES, _COUNTER, "Bytes the engine steps moved, by the cost model (weights + KV).",
         "step_stats.bytes"),
    _one(W_MODEL_FLOPS, _COUNTER, "FLOPs the engine steps computed, by the cost model.", "step_stats.flops"),
    _one(W_PEAK_BW, _GAUGE, "Memory bandwidth peak measured when the worker started.",
         "step_stats.peak_bandwidth_bytes_per_s"),
    _one(W_PEAK_FLOPS, _GAUGE, "Matmul FLOP/s peak in the model's compute dtype, measured when the worker "
         "started (the MFU gauge's denominator).", "step_stats.peak_flops_per_s"),
    WorkerMetric(W_XFER_BYTES, _COUNTER, "KV bytes moved by the transfer backend.",
                 (("sent", "kv_transfer.bytes_sent"), ("received", "kv_transfer.bytes_received")), "direction"),
    WorkerMetric(W_XFER_CHUNKS, _COUNTER, "KV transfer chunks moved.",
                 (("sent", "kv_transfer.chunks_sent"), ("received", "kv_transfer.chunks_received")), "direction"),
    # Only the sender measures transfer time (see KVTransferStats.seconds_sent).
    WorkerMetric(W_XFER_SECONDS, _COUNTER, "Seconds spent pushing KV (export, send, receiver's ack; summed).",
                 (("sent", "kv_transfer.seconds_sent"),), "direction"),
    _one(W_XFER_REFUSED, _COUNTER, "KV transfer connections refused for a missing or wrong token.",
         "kv_transfer.refused_unauthenticated"),
    _one(W_CACHED_BLOCKS, _GAUGE, "Free KV blocks that still hold a cached prefix (evictable; counted as free).",
         "prefix_cache.cached_blocks"),
    _one(W_PREFIX_QUERIED, _COUNTER, "Tokens looked up in the prefix cache (at admission or reservation).",
         "prefix_cache.queried_tokens"),
    _one(W_PREFIX_HIT, _COUNTER, "Looked-up tokens found in the prefix cache (neither computed nor moved).",
         "prefix_cache.hit_tokens"),
    _one(W_PREFIX_HIT_RATIO, _GAUGE, "Prefix cache hit tokens / queried tokens since the worker started.",
         "prefix_hit_rate"),
    _one(W_EVICTIONS, _COUNTER, "Cached KV blocks evicted to make room.", "prefix_cache.evictions"),
)

WORKER_METRIC_NAMES = tuple(metric.name for metric in WORKER_METRICS)


def _value(status: WorkerStatus, attribute: str) -> float | None:
    """The number at ``attribute`` of ``status``; ``None`` (nothing emitted) when it is ``None`` or not finite."""
    value = attrgetter(attribute)(status)
    if value is None or not math.isfinite(value):
        return None
    return float(value)


class WorkerStatusCollector(Collector):
    """Per-worker gauges and counters, read from :class:`WorkerStatus` values at scrape time.

    ``source`` returns the latest status of every worker that has reported
    one (the router's poll cache; it must be cheap and must not block). Each
    metric of :data:`WORKER_METRICS` is labelled with the status's
    ``worker_id`` and ``kind``; a value that is ``None`` (no peaks measured,
    no recent steps, no transfer time on a receiver) is not emitted for that
    worker — no fake zeros.

    Counters restart from zero when a worker is replaced; Prometheus'
    ``rate()`` handles that reset.
    """

    def __init__(self, source: Callable[[], Iterable[WorkerStatus]]) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        # Lets the registry check for duplicate names without calling source.
        for metric in WORKER_METRICS:
            yield self._family(metric)

    def collect(self) -> Iterator[Metric]:
        try:
            statuses = list(self._source())
        except Exception:
            # A scrape must not fail because one poll did.
            log.exception("worker status source failed; no worker metrics this scrape")
            return
        for metric in WORKER_METRICS:
            family = self._family(metric)
            for status in statuses:
                labels = [status.worker_id, status.kind]
                for label_value, attribute in metric.series:
                    value = _value(status, attribute)
                    if value is not None:
                        family.add_metric(labels + ([label_value] if metric.label else []), value)
            if family.samples:
                yield family

    @staticmethod
    def _family(metric: WorkerMetric) -> Metric:
        labels = list(WORKER_LABELS) + ([metric.label] if metric.label else [])
        if metric.type == _COUNTER:
            return CounterMetricFamily(metric.name, metric.help, labels=labels)
        return GaugeMetricFamily(metric.name, metric.help, labels=labels)


# --------------------------------------------------------------- autoscaler
AS_DECISIONS = "splitserve_autoscale_decisions_total"  # label action
AS_TARGET = "splitserve_autoscale_target_workers"  # label kind
AS_LIVE = "splitserve_autoscale_live_workers"  # label kind
AS_PENDING = "splitserve_autoscale_pending_workers"
AS_CAPPED = "splitserve_autoscale_capped_total"
AS_SWITCHES = "splitserve_autoscale_role_switches_total"
AS_SWITCH_FAILURES = "splitserve_autoscale_role_switch_failures_total"
AS_SWITCH_SECONDS = "splitserve_autoscale_last_role_switch_seconds"
AS_START_SECONDS = "splitserve_autoscale_last_worker_start_seconds"
AS_SHARE = "splitserve_autoscale_prefill_share_ratio"
AS_ATTAINMENT = "splitserve_autoscale_slo_attainment_ratio"  # label slo=ttft|tpot
AS_ADVISORY = "splitserve_autoscale_advisory"

AUTOSCALE_METRIC_NAMES = (AS_DECISIONS, AS_TARGET, AS_LIVE, AS_PENDING, AS_CAPPED, AS_SWITCHES, AS_SWITCH_FAILURES,
                          AS_SWITCH_SECONDS, AS_START_SECONDS, AS_SHARE, AS_ATTAINMENT, AS_ADVISORY)


class AutoscaleCollector(Collector):
    """The autoscaler's decisions and pool targets, from the latest :class:`AutoscaleReport`.

    ``source`` returns the report the router's directory last got from the pool
    manager (``None``: no autoscaler, nothing is emitted). A value that is
    ``None`` (no switch yet, no measurement yet) is not emitted.
    """

    def __init__(self, source: Callable[[], AutoscaleReport | None]) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the series depend on the report; nothing to check up front

    def collect(self) -> Iterator[Metric]:
        try:
            r = self._source()
        except Exception:
            log.exception("autoscale report source failed; no autoscale metrics this scrape")
            return
        if r is None:
            return
        decisions = CounterMetricFamily(AS_DECISIONS, "Autoscaler decisions by action (hold included).",
                                        labels=["action"])
        for action, n in r.decisions:
            decisions.add_metric([action], n)
        yield decisions
        for name, doc, pair in ((AS_TARGET, "Workers each pool is being moved to.", r.targets),
                                (AS_LIVE, "Workers each pool serves with now.", r.live)):
            family = GaugeMetricFamily(name, doc, labels=["kind"])
            for kind, n in zip(("prefill", "decode"), pair):
                family.add_metric([kind], n)
            yield family
        yield GaugeMetricFamily(AS_PENDING, "Worker starts under way (Ray placing them, or loading the model).",
                                value=r.pending)
        yield CounterMetricFamily(AS_CAPPED, "Decisions where a role needed more workers and max_total stopped it.",
                                  value=r.capped)
        yield CounterMetricFamily(AS_SWITCHES, "Workers that switched role in place.", value=r.role_switches)
        yield CounterMetricFamily(AS_SWITCH_FAILURES, "Role switches that failed (the worker was replaced).",
                                  value=r.switch_failures)
        yield GaugeMetricFamily(AS_ADVISORY, "1 when the autoscaler only advises (changes nothing).",
                                value=float(r.advisory))
        for name, doc, value in (
                (AS_SWITCH_SECONDS, "Seconds the latest in-place role switch took.", r.last_switch_s),
                (AS_START_SECONDS, "Seconds the latest fresh worker start took (placed and model loaded).",
                 r.last_start_s),
                (AS_SHARE, "The prefill share of workers the split aims at.", r.prefill_share)):
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)
        attainment = GaugeMetricFamily(AS_ATTAINMENT, "Share of recent requests within the SLO target.",
                                       labels=["slo"])
        for slo, value in (("ttft", r.ttft_attainment), ("tpot", r.tpot_attainment)):
            if value is not None:
                attainment.add_metric([slo], value)
        if attainment.samples:
            yield attainment


# ------------------------------------------------------------------ serving
def start_metrics_server(registry: CollectorRegistry, host: str = "127.0.0.1",
                         port: int = 0) -> tuple[WSGIServer, int]:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    ``port=0`` picks a free port; the bound port is returned. Stop it with
    ``server.shutdown(); server.server_close()``.
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_address[1])
