"""Prometheus metrics, with the reference agent's names (agent-behaviour.md §13) so dashboards carry over.

A private registry (not the global default) so tests can run several agents in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.plugin_requests = Counter(
            "istio_cni_plugin_requests",
            "CNI requests from the shim, by response code",
            ["response_code"],
            registry=self.registry,
        )
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

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)
