"""``/metrics``: the hub's counters in Prometheus' text format, read at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response

from tidings.endpoints.http_api import Endpoint

if TYPE_CHECKING:
    from tidings.core.hub import HubCore

__all__ = ["metrics_endpoint"]


class _HubCollector:
    """Reads the hub's plain counters at scrape time."""

    def __init__(self, hub: HubCore) -> None:
        self.hub = hub

    def collect(self) -> Any:
        hub, stats = self.hub, self.hub.stats
        yield GaugeMetricFamily("tidings_connections", "Open websocket connections",
                                value=len(hub.connections))
        yield GaugeMetricFamily("tidings_subscriptions", "Subscriptions of local connections",
                                value=sum(len(c.subs) for c in hub.connections.values()))
        yield GaugeMetricFamily("tidings_broker_up", "1 if the broker is reachable",
                                value=1 if hub.health().up else 0)
        for name, doc, value in (
            ("tidings_publications_in", "Publications published on this node",
             stats.publications_in),
            ("tidings_publications_out", "Publications received from the broker",
             stats.publications_out),
            ("tidings_deliveries", "Publication frames queued to connections", stats.deliveries),
            ("tidings_messages", "Direct messages queued to connections", stats.messages),
            ("tidings_dropped", "Publications dropped for slow connections", stats.dropped),
            ("tidings_overflows", "Outbox overflows", stats.overflows),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        errors = CounterMetricFamily("tidings_errors", "Error frames sent, by code",
                                     labels=["code"])
        for code, n in sorted(stats.errors.items()):
            errors.add_metric([code], n)
        yield errors
        refusals = CounterMetricFamily(
            "tidings_refusals", "Connections and requests refused, by reason", labels=["reason"])
        for reason, n in sorted(stats.refusals.items()):
            refusals.add_metric([reason], n)
        yield refusals
        yield _limits(hub)
        qlen = GaugeMetricFamily("tidings_queue_length", "Items waiting", labels=["queue"])
        qage = GaugeMetricFamily("tidings_queue_oldest_age_seconds", "Age of the oldest item",
                                 labels=["queue"])
        qfly = GaugeMetricFamily("tidings_queue_in_flight", "Items delivered, not acked",
                                 labels=["queue"])
        for name, queue in sorted(hub.queues.queues.items()):
            qlen.add_metric([name], len(queue))
            qage.add_metric([name], queue.oldest_age())
            qfly.add_metric([name], queue.in_flight)
        yield qlen
        yield qage
        yield qfly


def _limits(hub: HubCore) -> GaugeMetricFamily:
    """The configured limits (0: unlimited / off), so dashboards can show headroom."""
    limits = hub.limits
    gauge = GaugeMetricFamily("tidings_limit", "Configured limits (0: off)", labels=["name"])
    for name in ("frame_soft", "frame_hard", "max_subscriptions", "max_name", "max_depth",
                 "rate", "burst", "max_violations", "max_connections_per_user",
                 "max_connections_per_ip", "auth_timeout", "outbox_size", "outbox_bytes",
                 "idle_timeout"):
        value = getattr(limits, name, None)
        gauge.add_metric([name], float(value or 0))
    return gauge


def metrics_endpoint(hub: HubCore) -> Endpoint:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_HubCollector(hub))

    async def metrics(request: Request) -> Response:
        await hub.queues.refresh()  # shared queues: gauges from the store, not this node's view
        return Response(generate_latest(registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return metrics
