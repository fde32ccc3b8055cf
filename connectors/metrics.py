"""Prometheus metrics of the connectors, for the provincial operations centre.

Owns: what ``GET /metrics`` exposes. Per source, read from the inbox at each scrape (so
every process serving /metrics tells the same story, whichever process or machine did the
work): messages received and processed (counters), messages by state, failures by state
(failed, dead, rejected), the backlog, paused, messages per second over the last minute,
and the time of the last message received and processed. Besides, the histogram of how
long each processing batch (one database transaction) took, observed by the process that
ran it: ``hub serve`` for its in-process worker and MLLP listeners, ``hub connectors worker
--metrics-port`` for arq workers.
Calls: ``connectors.inbox.status``, prometheus-client.
Called by: ``connectors.api`` (``/metrics``), ``connectors.worker`` (``observe_batch``).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("queued", "processing", "processed", "rejected", "failed", "dead")
FAILURE_STATES = ("failed", "dead", "rejected")

# One per process: registered in every /metrics registry the process builds.
BATCH_SECONDS = Histogram(
    "hub_connector_batch_seconds",
    "Seconds one processing batch (one database transaction, group committed) took",
    ["mode"],  # in-process (listener or worker thread), arq-job, arq-cron
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=None,
)
BATCH_MESSAGES = Histogram(
    "hub_connector_batch_messages",
    "Messages in one processing batch",
    ["mode"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
    registry=None,
)


def observe_batch(mode: str, seconds: float, messages: int) -> None:
    BATCH_SECONDS.labels(mode).observe(seconds)
    BATCH_MESSAGES.labels(mode).observe(messages)


def _timestamp(value: Any) -> float | None:
    """Seconds since the epoch of a status time (datetime or ISO string)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class InboxCollector(Collector):
    """Reads ``inbox.status`` at each scrape and turns it into metric families."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def describe(self) -> list[Any]:
        return []  # not known before the first collect: no check at registration

    def collect(self) -> Iterator[Any]:
        from connectors import inbox

        received = CounterMetricFamily(
            "hub_connector_messages_received", "Messages received into the inbox", labels=["source"]
        )
        processed = CounterMetricFamily(
            "hub_connector_messages_processed",
            "Messages processed (written to the record)",
            labels=["source"],
        )
        by_state = GaugeMetricFamily(
            "hub_connector_messages", "Inbox messages by state", labels=["source", "state"]
        )
        failures = GaugeMetricFamily(
            "hub_connector_failures",
            "Failed (retrying), dead and rejected messages",
            labels=["source", "state"],
        )
        backlog = GaugeMetricFamily(
            "hub_connector_backlog", "Messages waiting (queued, processing, failed)", labels=["source"]
        )
        rate = GaugeMetricFamily(
            "hub_connector_messages_per_second", "Messages processed per second, last 60 s", labels=["source"]
        )
        paused = GaugeMetricFamily("hub_connector_paused", "1 when the source is paused", labels=["source"])
        last_received = GaugeMetricFamily(
            "hub_connector_last_message_timestamp_seconds",
            "When the source's last message was received (Unix time)",
            labels=["source"],
        )
        last_processed = GaugeMetricFamily(
            "hub_connector_last_processed_timestamp_seconds",
            "When the source's last message was processed (Unix time)",
            labels=["source"],
        )
        for status in inbox.status(self.engine):
            row = status.as_json()
            name = str(row["name"])
            counts: dict[str, int] = {s: int(row.get("counts", {}).get(s, 0)) for s in STATES}
            received.add_metric([name], float(sum(counts.values())))
            processed.add_metric([name], float(counts["processed"]))
            for state in STATES:
                by_state.add_metric([name, state], float(counts[state]))
            for state in FAILURE_STATES:
                failures.add_metric([name, state], float(counts[state]))
            backlog.add_metric([name], float(row.get("backlog", 0)))
            rate.add_metric([name], float(row.get("messages_per_second", 0.0)))
            paused.add_metric([name], 1.0 if row.get("paused") else 0.0)
            for family, key in ((last_received, "last_received_at"), (last_processed, "last_processed_at")):
                moment = _timestamp(row.get(key))
                if moment is not None:
                    family.add_metric([name], moment)
        yield from (
            received,
            processed,
            by_state,
            failures,
            backlog,
            rate,
            paused,
            last_received,
            last_processed,
        )


def registry_for(engine: sa.Engine) -> CollectorRegistry:
    """The registry one app serves at /metrics: the inbox, read per scrape, and this
    process's batch histograms."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(InboxCollector(engine))
    registry.register(BATCH_SECONDS)
    registry.register(BATCH_MESSAGES)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The text format Prometheus scrapes."""
    return generate_latest(registry)
