"""Every flag of design.md exists with its default, env var and precedence (flag > env > default)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cni_agent.config import RUN_OPTIONS, ConfigError, parse_run_args

DESIGN_DEFAULTS = {
    "--run-dir": "/var/run/ambient-cni",
    "--ztunnel-socket": "/var/run/ztunnel/ztunnel.sock",
    "--rules-backend": "auto",
    "--cni-bin-dir": "/opt/cni/bin",
    "--cni-conf-dir": "/etc/cni/net.d",
    "--host-proc": "/proc",
    "--exclude-namespaces": "kube-system",
    "--metrics-port": "15014",
    "--health-port": "8000",
}


def test_design_flags_and_defaults() -> None:
    by_flag = {o.flag: o for o in RUN_OPTIONS}
    for flag, default in DESIGN_DEFAULTS.items():
        assert by_flag[flag].default == default
    assert {"--pod-source", "--node-name"} <= by_flag.keys()
    assert by_flag["--run-dir"].env == "CNI_AGENT_RUN_DIR"
    s = parse_run_args([], {})
    assert s.run_dir == Path("/var/run/ambient-cni")
    assert s.plugin_socket == Path("/var/run/ambient-cni/plugin.sock")
    assert s.admin_socket == Path("/var/run/ambient-cni/admin.sock")
    assert s.exclude_namespaces == frozenset({"kube-system"})
    assert (s.metrics_port, s.health_port) == (15014, 8000)


def test_flag_beats_env_beats_default() -> None:
    env = {"CNI_AGENT_RUN_DIR": "/env/run", "CNI_AGENT_HEALTH_PORT": "0", "NODE_NAME": "n1"}
    s = parse_run_args(["--run-dir", "/flag/run"], env)
    assert s.run_dir == Path("/flag/run")
    assert s.health_port == 0
    assert s.node_name == "n1"
    assert parse_run_args([], env).run_dir == Path("/env/run")


def test_pod_source_default_depends_on_cluster() -> None:
    assert parse_run_args([], {}).pod_source == "local"
    assert parse_run_args([], {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).pod_source == "kubernetes"
    assert parse_run_args(["--pod-source", "local"], {"KUBERNETES_SERVICE_HOST": "x"}).pod_source == "local"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CNI_AGENT_METRICS_PORT": "abc"}, "--metrics-port / CNI_AGENT_METRICS_PORT"),
        ({"CNI_AGENT_HEALTH_PORT": "70000"}, "outside"),
        ({"CNI_AGENT_RUN_DIR": "relative/dir"}, "absolute path"),
        ({"CNI_AGENT_RULES_BACKEND": "ebpf"}, "not one of"),
        ({"CNI_AGENT_DNS_CAPTURE": "maybe"}, "true or false"),
        ({"CNI_AGENT_PROBE_SNAT_IPV4": "169.254.7.0/24"},
         "--probe-snat-ipv4 / CNI_AGENT_PROBE_SNAT_IPV4: .* not an IP"),
        ({"CNI_AGENT_PROBE_SNAT_IPV4": "fd00::1"}, "not an IPv4 address"),
        ({"CNI_AGENT_PROBE_SNAT_IPV6": "169.254.7.127"}, "not an IPv6 address"),
        ({"CNI_AGENT_PROBE_SNAT_IPV4": "127.0.0.5"}, "loopback"),
        ({"CNI_AGENT_PROBE_SNAT_IPV6": "::ffff:169.254.7.127"}, "v4-mapped"),
    ],
)
def test_bad_values_name_the_knob(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_run_args([], env)


def test_exclude_namespaces_list() -> None:
    s = parse_run_args(["--exclude-namespaces", " kube-system, istio-system ,,"], {})
    assert s.exclude_namespaces == frozenset({"kube-system", "istio-system"})


def test_probe_snat_addresses_default_to_the_spec_and_are_canonical() -> None:
    s = parse_run_args([], {})
    assert s.probe_snat == {4: "169.254.7.127", 6: "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"}
    env = {"CNI_AGENT_PROBE_SNAT_IPV4": " 169.254.1.1 "}
    s = parse_run_args(["--probe-snat-ipv6", "FD00:0:0::0001"], env)
    assert s.probe_snat == {4: "169.254.1.1", 6: "fd00::1"}
