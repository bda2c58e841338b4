"""Prometheus metrics, with the reference agent's names (agent-behaviour.md §13) so dashboards carry over.

A private registry (not the global default) so tests can run several agents in one process. Counts
that components already keep (the plugin server's replies) are read at scrape time by a collector
instead of being mirrored, so there is one source of truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class _PluginRequests(Collector):
    def __init__(self, source: Callable[[], Mapping[tuple[str, int], int]]) -> None:
        self._source = source

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "istio_cni_plugin_requests",
            "CNI requests from the shim, by command and CNI response code",
            labels=["command", "response_code"],
        )
        for (command, code), count in sorted(self._source().items()):
            family.add_metric([command, str(code)], count)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ztunnel_connected = Gauge(
            "ztunnel_connected", "live ZDS connections from ztunnel", registry=self.registry
        )
        self.pods_enrolled = Gauge(
            "cni_agent_pods_enrolled", "pods in the agent's cache", registry=self.registry
        )
        self.rules_backend = Gauge(
            "cni_agent_rules_backend",
            "the in-pod rule backend in use (1 = this one)",
            ["backend"],
            registry=self.registry,
        )

    def watch_plugin_requests(self, source: Callable[[], Mapping[tuple[str, int], int]]) -> None:
        self.registry.register(_PluginRequests(source))

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)
