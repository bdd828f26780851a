"""``GET /metrics``: the queue in Prometheus' text format (``prometheus_client``).

Each server has its own registry. The job counts are read from the store at each
scrape (so they are the database's, whichever front end is asked); the claim
latency, from a job's acceptance to its start, is observed by the runner that
claims it.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sfumato.server.errors import responses
from sfumato.server.jobs.store import ACTIVE, FINAL, QUEUED
from sfumato.server.state import ServerState, require_key

CLAIM_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)
"""Seconds: from a few milliseconds (an idle runner) to a long backlog."""


def claim_latency(registry: CollectorRegistry) -> Histogram:
    """The histogram a runner observes each claim in."""
    return Histogram(
        "sfumato_claim_latency_seconds",
        "Seconds from a job's acceptance to its claim by a runner",
        buckets=CLAIM_BUCKETS,
        registry=registry,
    )


class QueueCollector(Collector):
    """Jobs by state, the queue's depth and the live workers, read from the store at each scrape."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.state.store.counts_by_state()
        jobs = GaugeMetricFamily("sfumato_jobs", "Jobs in the store by state", labels=["state"])
        for name in (*ACTIVE, *FINAL):
            jobs.add_metric([name], counts.get(name, 0))
        yield jobs
        yield GaugeMetricFamily("sfumato_queue_depth", "Jobs waiting to be claimed", value=counts.get(QUEUED, 0))
        live = len(self.state.store.workers(self.state.settings.lease_s))
        yield GaugeMetricFamily("sfumato_workers", "Live workers on this job store (on every machine)", value=live)


def router(state: ServerState, registry: CollectorRegistry) -> APIRouter:
    api = APIRouter(dependencies=[Depends(require_key(state.settings))], tags=["operations"])
    registry.register(QueueCollector(state))

    @api.get("/metrics", response_class=Response, responses=responses())
    def metrics() -> Response:
        """Prometheus metrics: ``sfumato_jobs{state}``, ``sfumato_queue_depth``,
        ``sfumato_workers``, ``sfumato_claim_latency_seconds``."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return api
