"""Command line: `cni-agent run | demo | status | inspect POD | version`.

Parsing and wiring only: flags become one validated Settings object (config.py), and `run` builds
the adapters and hands them to the orchestrator (agent.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from cni_agent import __version__
from cni_agent.config import ConfigError, Settings, add_run_arguments, resolve
from cni_agent.ops import logging as ops_logging

log = structlog.get_logger("cni_agent")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Start every component in the order of agent-behaviour.md §8, serve until `stop`, then shut down."""
    from cni_agent.agent import Agent
    from cni_agent.cni.server import PluginServer
    from cni_agent.local.registry import LocalRegistry
    from cni_agent.ops.health import HealthServer
    from cni_agent.ops.metrics import Metrics
    from cni_agent.redirect.backend import BackendError, select_backend
    from cni_agent.redirect.dataplane import KernelDataplane
    from cni_agent.redirect.hostprobe import HostProbeConfig, make_host_probe
    from cni_agent.redirect.netns import NetnsWorker
    from cni_agent.zds.server import ZdsServer

    if settings.pod_source != "local":
        raise ConfigError(
            "--pod-source kubernetes is not available yet in this build; use --pod-source local"
        )
    if settings.ipv6 and not os.path.exists("/proc/sys/net/ipv6"):
        log.warning("the kernel has no IPv6: programming IPv4 rules only", flag="--ipv6")
        settings = dataclasses.replace(settings, ipv6=False)
    settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        backend = await asyncio.to_thread(select_backend, settings.run_dir, settings.rules_backend)
    except BackendError as exc:
        raise ConfigError(f"rules backend: {exc}") from exc
    metrics = Metrics()
    worker = NetnsWorker()
    agent: Agent | None = None
    zds = ZdsServer(
        str(settings.ztunnel_socket),
        lambda: agent.snapshot() if agent else [],
        on_change=metrics.ztunnel_connected.set,
    )
    dataplane = KernelDataplane(worker, backend=backend.name, ipv6=settings.ipv6,
                                probe_snat=settings.probe_snat)
    probe = make_host_probe(
        backend.name,
        worker,
        HostProbeConfig(enabled=settings.host_probe, ipv6=settings.ipv6, proc_root=str(settings.host_proc),
                        snat_ipv4=settings.probe_snat_ipv4, snat_ipv6=settings.probe_snat_ipv6),
    )
    agent = Agent(settings, dataplane, zds, LocalRegistry(settings.local_registry), probe=probe)
    plugin = PluginServer(str(settings.plugin_socket), agent)
    metrics.watch_plugin_requests(lambda: plugin.responses)
    metrics.pods_enrolled.set_function(lambda: len(agent.cache) if agent else 0)
    metrics.rules_backend.labels(backend=backend.name).set(1)
    health = HealthServer(
        settings.health_port, lambda: (True, "") if agent and agent.ready else (False, "starting")
    )
    try:
        metrics.serve(settings.metrics_port)
        await health.start()
        await asyncio.to_thread(probe.install, retries=10, retry_delay=2.0)
        await agent.restore()
        await zds.bind()
        await plugin.start()
        await zds.start_accepting()
        agent.mark_ready()
        plugin.mark_ready()
        log.info(
            "cni-agent ready",
            version=__version__,
            pod_source=settings.pod_source,
            plugin_socket=str(settings.plugin_socket),
            ztunnel_socket=str(settings.ztunnel_socket),
            rules_backend=backend.name,
            rules_backend_evidence=backend.evidence,
            pods=len(agent.cache),
        )
        await stop.wait()
        log.info("cni-agent stopping")
    finally:
        await health.close()
        await plugin.close()
        await zds.close()
        agent.close()
        worker.close()


def cmd_run(args: argparse.Namespace) -> int:
    settings = resolve(args)
    ops_logging.configure(settings.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    settings = resolve(args)
    registry = settings.local_registry
    pods = json.loads(registry.read_text()).get("pods", []) if registry.exists() else []
    out = {
        "ready_marker": settings.ready_marker.exists(),
        "plugin_socket": str(settings.plugin_socket),
        "plugin_socket_present": settings.plugin_socket.exists(),
        "pods": [
            {"pod": f"{p['namespace']}/{p['name']}", "uid": p["uid"], "netns": p["netns_path"]} for p in pods
        ],
    }
    print(json.dumps(out, indent=2))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    settings = resolve(args)
    registry = settings.local_registry
    pods = json.loads(registry.read_text()).get("pods", []) if registry.exists() else []
    for p in pods:
        if args.pod in (p["uid"], p["name"], f"{p['namespace']}/{p['name']}", p.get("container_id")):
            print(json.dumps(p, indent=2))
            return 0
    print(f"cni-agent: no enrolled pod matches {args.pod!r} (registry {registry})", file=sys.stderr)
    return 1


def cmd_uninstall(args: argparse.Namespace) -> int:
    """Remove what the agent put on the node outside pods: the host probe rule and probe sets.

    Run it only when the agent is being removed from the node for good: while the agent is merely
    restarting or upgrading these must stay (kubelet probes of running pods depend on them).
    In-pod rules of running pods are left alone; they disappear with the pods.
    """
    from cni_agent.redirect.backend import read_persisted
    from cni_agent.redirect.hostprobe import HostProbeConfig, make_host_probe
    from cni_agent.redirect.netns import NetnsWorker

    settings = resolve(args)
    ops_logging.configure(settings.log_level)
    backend = read_persisted(settings.run_dir)
    if backend is None:
        print(
            f"cni-agent: nothing to uninstall: no rules backend recorded in {settings.run_dir}",
            file=sys.stderr,
        )
        return 0
    worker = NetnsWorker()
    try:
        probe = make_host_probe(
            backend, worker, HostProbeConfig(ipv6=settings.ipv6, proc_root=str(settings.host_proc),
                                             snat_ipv4=settings.probe_snat_ipv4,
                                             snat_ipv6=settings.probe_snat_ipv6)
        )
        probe.uninstall()
    finally:
        worker.close()
    settings.ready_marker.unlink(missing_ok=True)
    print(
        f"cni-agent: removed the host probe rule and probe sets ({backend}); "
        "pods' own rules were left in place"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cni_agent.demo import run_demo

    return run_demo(plugin=Path(args.plugin), keep_logs=args.keep_logs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cni-agent", description="Istio ambient node agent")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the agent")
    add_run_arguments(p_run)
    p_run.set_defaults(func=cmd_run)
    p_demo = sub.add_parser("demo", help="enrol pods on a throwaway local node, end to end (root)")
    p_demo.add_argument("--plugin", default="build/bin/ambient-cni", help="path of the built shim")
    p_demo.add_argument("--keep-logs", action="store_true", help="print the agent's log at the end")
    p_demo.set_defaults(func=cmd_demo)
    p_status = sub.add_parser("status", help="what the agent on this node has enrolled")
    add_run_arguments(p_status)
    p_status.set_defaults(func=cmd_status)
    p_inspect = sub.add_parser("inspect", help="one pod's record")
    p_inspect.add_argument("pod", help="uid, name, namespace/name or container id")
    add_run_arguments(p_inspect)
    p_inspect.set_defaults(func=cmd_inspect)
    p_uninstall = sub.add_parser("uninstall", help="remove host-side rules and sets (agent leaving the node)")
    add_run_arguments(p_uninstall)
    p_uninstall.set_defaults(func=cmd_uninstall)
    p_version = sub.add_parser("version", help="print the version")
    p_version.set_defaults(func=lambda _a: print(f"cni-agent {__version__}") or 0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"cni-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
