"""One typed settings object, built once from flags and environment, validated once.

Every path and port is overridable by flag and by `CNI_AGENT_<FLAG>` (flag wins) so tests and the
demo can run several agents side by side in temporary directories (design.md, "Names and paths").
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cni_agent.redirect.rules import PROBE_SNAT_IPV4, PROBE_SNAT_IPV6, check_probe_snat

ENV_PREFIX = "CNI_AGENT_"
POD_SOURCES = ("kubernetes", "local")
RULES_BACKENDS = ("auto", "iptables-legacy", "nftables")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting the operator gave is unusable; the message names the flag, the env var and the value."""


@dataclass(frozen=True, slots=True)
class Option:
    flag: str
    default: str
    help: str
    choices: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


def _default_pod_source(environ: Mapping[str, str]) -> str:
    return "kubernetes" if environ.get("KUBERNETES_SERVICE_HOST") else "local"


# The contract table of design.md; `{pod_source}` and `{node_name}` defaults are computed.
RUN_OPTIONS: tuple[Option, ...] = (
    Option(
        "--pod-source", "", "where pods come from (default: kubernetes in a cluster, else local)", POD_SOURCES
    ),
    Option("--run-dir", "/var/run/ambient-cni", "agent run dir: plugin.sock, admin.sock, state files"),
    Option("--ztunnel-socket", "/var/run/ztunnel/ztunnel.sock", "ZDS socket the agent listens on"),
    Option("--rules-backend", "auto", "in-pod rule backend", RULES_BACKENDS),
    Option("--cni-bin-dir", "/opt/cni/bin", "where the ambient-cni shim is installed"),
    Option("--cni-conf-dir", "/etc/cni/net.d", "the node's CNI configuration directory"),
    Option("--host-proc", "/proc", "the host's /proc (/host/proc in the DaemonSet)"),
    Option("--exclude-namespaces", "kube-system", "comma-separated namespaces never enrolled"),
    Option("--metrics-port", "15014", "Prometheus metrics port (0 disables)"),
    Option("--health-port", "8000", "healthz/readyz port (0 disables)"),
    Option("--node-name", "", "this node's name (default: $NODE_NAME)"),
    Option("--log-level", "info", "log level", LOG_LEVELS),
    Option("--dns-capture", "true", "capture DNS to ztunnel by default (pods may override)"),
    Option("--ipv6", "true", "also program IPv6 rules (skipped with a warning if the kernel has no IPv6)"),
    Option(
        "--netns-host-prefix",
        "",
        "prefix for host netns paths when the agent runs in a container (e.g. /host)",
    ),
    Option("--host-probe", "true", "SNAT kubelet probes to enrolled pods (host rule + probe address set)"),
    Option("--probe-snat-ipv4", PROBE_SNAT_IPV4,
           "source address kubelet probes are SNATed to; pods accept it (network policies must admit it)"),
    Option("--probe-snat-ipv6", PROBE_SNAT_IPV6, "the same for IPv6"),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated agent configuration; derived paths are properties so they never disagree."""

    pod_source: str = "local"
    run_dir: Path = Path("/var/run/ambient-cni")
    ztunnel_socket: Path = Path("/var/run/ztunnel/ztunnel.sock")
    rules_backend: str = "auto"
    cni_bin_dir: Path = Path("/opt/cni/bin")
    cni_conf_dir: Path = Path("/etc/cni/net.d")
    host_proc: Path = Path("/proc")
    exclude_namespaces: frozenset[str] = field(default_factory=lambda: frozenset({"kube-system"}))
    metrics_port: int = 15014
    health_port: int = 8000
    node_name: str = ""
    log_level: str = "info"
    dns_capture: bool = True
    ipv6: bool = True
    netns_host_prefix: str = ""
    host_probe: bool = True
    probe_snat_ipv4: str = PROBE_SNAT_IPV4
    probe_snat_ipv6: str = PROBE_SNAT_IPV6

    @property
    def probe_snat(self) -> dict[int, str]:
        return {4: self.probe_snat_ipv4, 6: self.probe_snat_ipv6}

    @property
    def plugin_socket(self) -> Path:
        return self.run_dir / "plugin.sock"

    @property
    def admin_socket(self) -> Path:
        return self.run_dir / "admin.sock"

    @property
    def ready_marker(self) -> Path:
        """Written once the agent is first ready; the shim's STATUS boot gate reads it (run dir is tmpfs)."""
        return self.run_dir / "ready"

    @property
    def local_registry(self) -> Path:
        return self.run_dir / "local-pods.json"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags default to None so that an unset flag can fall back to the environment."""
    for opt in RUN_OPTIONS:
        parser.add_argument(
            opt.flag,
            default=None,
            choices=opt.choices or None,
            help=f"{opt.help} [env {opt.env}; default {opt.default or '-'}]",
        )


_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True", "yes", "on"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False", "no", "off"})


def _bool(opt: Option, raw: str) -> bool:
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{opt.flag} / {opt.env}: expected true or false, got {raw!r}")


def _port(opt: Option, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{opt.flag} / {opt.env}: expected a port number, got {raw!r}") from None
    if not 0 <= value <= 65535:
        raise ConfigError(f"{opt.flag} / {opt.env}: port {value} is outside 0..65535 (0 disables)")
    return value


def _path(opt: Option, raw: str) -> Path:
    if not raw or not os.path.isabs(raw):
        raise ConfigError(f"{opt.flag} / {opt.env}: expected an absolute path, got {raw!r}")
    return Path(raw)


def _probe_snat(opt: Option, raw: str, family: int) -> str:
    try:
        return check_probe_snat(raw, family)
    except ValueError as exc:
        raise ConfigError(f"{opt.flag} / {opt.env}: {exc}") from None


def resolve(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flag > env > default, then validate every value once, with messages that name the knob."""
    env = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    for opt in RUN_OPTIONS:
        value = getattr(args, opt.dest, None) if args is not None else None
        if value is None:
            value = env.get(opt.env)
        if value is None:
            value = opt.default
        if opt.choices and value and value not in opt.choices:
            raise ConfigError(f"{opt.flag} / {opt.env}: {value!r} is not one of {', '.join(opt.choices)}")
        raw[opt.dest] = value
    by = {opt.dest: opt for opt in RUN_OPTIONS}
    return Settings(
        pod_source=raw["pod_source"] or _default_pod_source(env),
        run_dir=_path(by["run_dir"], raw["run_dir"]),
        ztunnel_socket=_path(by["ztunnel_socket"], raw["ztunnel_socket"]),
        rules_backend=raw["rules_backend"],
        cni_bin_dir=_path(by["cni_bin_dir"], raw["cni_bin_dir"]),
        cni_conf_dir=_path(by["cni_conf_dir"], raw["cni_conf_dir"]),
        host_proc=_path(by["host_proc"], raw["host_proc"]),
        exclude_namespaces=frozenset(ns.strip() for ns in raw["exclude_namespaces"].split(",") if ns.strip()),
        metrics_port=_port(by["metrics_port"], raw["metrics_port"]),
        health_port=_port(by["health_port"], raw["health_port"]),
        node_name=raw["node_name"] or env.get("NODE_NAME", ""),
        log_level=raw["log_level"],
        dns_capture=_bool(by["dns_capture"], raw["dns_capture"]),
        ipv6=_bool(by["ipv6"], raw["ipv6"]),
        netns_host_prefix=raw["netns_host_prefix"].rstrip("/"),
        host_probe=_bool(by["host_probe"], raw["host_probe"]),
        probe_snat_ipv4=_probe_snat(by["probe_snat_ipv4"], raw["probe_snat_ipv4"], 4),
        probe_snat_ipv6=_probe_snat(by["probe_snat_ipv6"], raw["probe_snat_ipv6"], 6),
    )


def parse_run_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Convenience for tests: parse `cni-agent run` flags only."""
    parser = argparse.ArgumentParser(prog="cni-agent run")
    add_run_arguments(parser)
    return resolve(parser.parse_args(list(argv)), environ)
