"""Tables for cni.request: env/stdin validation codes, CNI_ARGS, pod IPs and result conversions."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from cni_agent.cni.request import (
    SUPPORTED_VERSIONS,
    CniError,
    PluginSettings,
    convert_result,
    emit_result,
    parse_cni_args,
    parse_request,
    result_ips,
    version_reply,
)

K8S_ARGS = (
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;"
    "K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=7f1c-uid"
)

ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc123",
    "CNI_NETNS": "/var/run/netns/cni-1234",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": K8S_ARGS,
    "CNI_PATH": "/opt/cni/bin",
}

# --- concrete results in each shape (the same attachment) --------------------------------------

R110: dict[str, Any] = {
    "cniVersion": "1.1.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
        {"name": "eth0", "mac": "aa:bb:cc:00:00:02", "sandbox": "/var/run/netns/cni-1234", "mtu": 1450},
    ],
    "ips": [
        {"interface": 1, "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
        {"interface": 1, "address": "10.244.1.6/24"},
        {"interface": 1, "address": "fd00::5/64", "gateway": "fd00::1"},
    ],
    "routes": [
        {"dst": "0.0.0.0/0", "gw": "10.244.1.1", "mtu": 1400},
        {"dst": "::/0"},
    ],
    "dns": {"nameservers": ["10.96.0.10"]},
}
R100 = {**copy.deepcopy(R110), "cniVersion": "1.0.0"}
R040: dict[str, Any] = {
    "cniVersion": "0.4.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
        {"name": "eth0", "mac": "aa:bb:cc:00:00:02", "sandbox": "/var/run/netns/cni-1234"},
    ],
    "ips": [
        {"interface": 1, "address": "10.244.1.5/24", "gateway": "10.244.1.1", "version": "4"},
        {"interface": 1, "address": "10.244.1.6/24", "version": "4"},
        {"interface": 1, "address": "fd00::5/64", "gateway": "fd00::1", "version": "6"},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0"}],
    "dns": {"nameservers": ["10.96.0.10"]},
}
R031 = {**copy.deepcopy(R040), "cniVersion": "0.3.1"}
R020: dict[str, Any] = {
    "cniVersion": "0.2.0",
    "ip4": {
        "ip": "10.244.1.5/24",
        "gateway": "10.244.1.1",
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
    },
    "ip6": {"ip": "fd00::5/64", "gateway": "fd00::1", "routes": [{"dst": "::/0"}]},
    "dns": {"nameservers": ["10.96.0.10"]},
}


def stdin(version: Any = "1.0.0", **extra: Any) -> bytes:
    conf: dict[str, Any] = {"cniVersion": version, "name": "k8s-pod-network", "type": "ambient-cni"}
    conf.update(extra)
    return json.dumps({k: v for k, v in conf.items() if v is not None}).encode()


def env(**over: str | None) -> dict[str, str]:
    out = dict(ENV)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


# --- parsing ---------------------------------------------------------------------------------


def test_add_request_fields() -> None:
    req = parse_request(
        env(),
        stdin(
            "1.0.0",
            prevResult=R100,
            agent_socket="/run/x/plugin.sock",
            exclude_namespaces=["kube-system", "infra"],
            pod_namespace="mesh",
            pod_name_prefix="agent-",
            timeout_seconds=3,
            status_gate="always",
            log_level="debug",
        ),
    )
    assert (req.command, req.cni_version, req.container_id) == ("ADD", "1.0.0", "abc123")
    assert (req.netns, req.ifname, req.path) == ("/var/run/netns/cni-1234", "eth0", "/opt/cni/bin")
    assert (req.pod_namespace, req.pod_name, req.pod_uid, req.infra_container_id) == (
        "default",
        "web-1",
        "7f1c-uid",
        "abc123",
    )
    assert req.args["IgnoreUnknown"] == "1"
    assert req.prev_result == R100
    assert req.ips == ("10.244.1.5", "10.244.1.6", "fd00::5")
    assert req.config["type"] == "ambient-cni"
    assert req.settings == PluginSettings(
        agent_socket="/run/x/plugin.sock",
        exclude_namespaces=("kube-system", "infra"),
        pod_namespace="mesh",
        pod_name_prefix="agent-",
        timeout_seconds=3.0,
        status_gate="always",
        log_level="debug",
    )
    assert req.is_kubernetes_pod and not req.is_agent_pod and not req.is_excluded_namespace


def test_defaults_and_pod_classification() -> None:
    req = parse_request(
        env(CNI_ARGS="K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=ambient-cni-node-x7"), stdin()
    )
    assert req.settings == PluginSettings()
    assert req.prev_result is None and req.ips == ()
    assert req.is_agent_pod and not req.is_excluded_namespace
    req = parse_request(env(CNI_ARGS="K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns"), stdin())
    assert req.is_excluded_namespace and not req.is_agent_pod
    req = parse_request(env(CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=podman-ctr"), stdin())
    assert not req.is_kubernetes_pod and not req.is_excluded_namespace


@pytest.mark.parametrize(
    ("name", "environ", "data", "code", "needle"),
    [
        ("no command", env(CNI_COMMAND=None), stdin(), 4, "CNI_COMMAND"),
        ("empty command", env(CNI_COMMAND=""), stdin(), 4, "CNI_COMMAND"),
        ("bogus command", env(CNI_COMMAND="add"), stdin(), 4, "'add'"),
        ("empty stdin", env(), b"", 6, "decode"),
        ("invalid JSON", env(), b"{not json", 6, "decode"),
        ("JSON array", env(), b"[1, 2]", 6, "decode"),
        ("invalid UTF-8", env(), b'{"cniVersion": "\xff"}', 6, "decode"),
        ("missing cniVersion", env(), stdin(None), 7, "cniVersion"),
        ("unsupported version", env(), stdin("0.5.0"), 1, "incompatible"),
        ("numeric version", env(), stdin(1), 1, "incompatible"),
        ("missing name", env(), stdin(name=None), 7, "network name"),
        ("bad name", env(), stdin(name="-net"), 7, "network name"),
        ("ADD without container id", env(CNI_CONTAINERID=None), stdin(), 4, "CNI_CONTAINERID"),
        ("ADD without netns", env(CNI_NETNS=None), stdin(), 4, "CNI_NETNS"),
        ("ADD without ifname", env(CNI_IFNAME=None), stdin(), 4, "CNI_IFNAME"),
        ("CHECK without netns", env(CNI_COMMAND="CHECK", CNI_NETNS=""), stdin(), 4, "CNI_NETNS"),
        (
            "DEL without container id",
            env(CNI_COMMAND="DEL", CNI_CONTAINERID=None),
            stdin(),
            4,
            "CNI_CONTAINERID",
        ),
        ("container id leading dash", env(CNI_CONTAINERID="-abc"), stdin(), 4, "CNI_CONTAINERID"),
        ("container id with slash", env(CNI_CONTAINERID="a/b"), stdin(), 4, "CNI_CONTAINERID"),
        ("ifname too long", env(CNI_IFNAME="e" * 16), stdin(), 4, "CNI_IFNAME"),
        ("ifname with slash", env(CNI_IFNAME="et/h0"), stdin(), 4, "CNI_IFNAME"),
        ("relative netns", env(CNI_NETNS="netns/x"), stdin(), 4, "CNI_NETNS"),
        ("args pair without =", env(CNI_ARGS="K8S_POD_NAME"), stdin(), 4, "CNI_ARGS"),
        ("args pair with two =", env(CNI_ARGS="a=b=c"), stdin(), 4, "CNI_ARGS"),
        ("args empty key", env(CNI_ARGS="=x"), stdin(), 4, "CNI_ARGS"),
        ("CHECK needs 0.4.0", env(CNI_COMMAND="CHECK"), stdin("0.3.1"), 1, "CHECK"),
        ("STATUS needs 1.1.0", {"CNI_COMMAND": "STATUS"}, stdin("1.0.0"), 1, "STATUS"),
        ("GC needs 1.1.0", {"CNI_COMMAND": "GC"}, stdin("0.4.0"), 1, "GC"),
        ("exclude not a list", env(), stdin(exclude_namespaces="kube-system"), 7, "exclude_namespaces"),
        ("exclude with number", env(), stdin(exclude_namespaces=["a", 1]), 7, "exclude_namespaces"),
        ("relative socket", env(), stdin(agent_socket="plugin.sock"), 7, "agent_socket"),
        ("zero timeout", env(), stdin(timeout_seconds=0), 7, "timeout_seconds"),
        ("bool timeout", env(), stdin(timeout_seconds=True), 7, "timeout_seconds"),
        ("bad status gate", env(), stdin(status_gate="sometimes"), 7, "status_gate"),
        ("pod namespace not str", env(), stdin(pod_namespace=["x"]), 7, "pod_namespace"),
        ("prevResult not object", env(), stdin(prevResult=[1]), 6, "prevResult"),
        (
            "prevResult bad address",
            env(),
            stdin(prevResult={"ips": [{"address": "10.1.1/24"}]}),
            6,
            "address",
        ),
        ("prevResult bad version", env(), stdin(prevResult={"cniVersion": "9.0.0"}), 1, "prevResult"),
        ("prevResult ips not list", env(), stdin(prevResult={"ips": {"address": "10.0.0.1"}}), 6, "ips"),
        (
            "GC bad attachments",
            {"CNI_COMMAND": "GC"},
            stdin("1.1.0", **{"cni.dev/valid-attachments": [{"ifname": "eth0"}]}),
            7,
            "valid-attachments",
        ),
    ],
)
def test_parse_errors(name: str, environ: dict[str, str], data: bytes, code: int, needle: str) -> None:
    with pytest.raises(CniError) as info:
        parse_request(environ, data)
    err = info.value
    assert err.code == code, (name, err)
    assert needle in err.msg, (name, err.msg)


@pytest.mark.parametrize(
    ("name", "environ", "data"),
    [
        ("DEL without netns", env(CNI_COMMAND="DEL", CNI_NETNS=None), stdin()),
        ("DEL with empty netns", env(CNI_COMMAND="DEL", CNI_NETNS=""), stdin("0.4.0", prevResult={})),
        ("netns of a process", env(CNI_NETNS="/proc/4242/ns/net"), stdin()),
        ("no CNI_PATH", env(CNI_PATH=None), stdin()),
        ("no CNI_ARGS", env(CNI_ARGS=None), stdin()),
        ("unknown args without IgnoreUnknown", env(CNI_ARGS="FOO=bar;K8S_POD_NAME=x"), stdin()),
        ("trailing semicolon", env(CNI_ARGS="K8S_POD_NAME=x;"), stdin()),
        ("empty arg value", env(CNI_ARGS="K8S_POD_NAMESPACE="), stdin()),
        ("CHECK at 0.4.0", env(CNI_COMMAND="CHECK"), stdin("0.4.0")),
        ("STATUS with only CNI_PATH", {"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}, stdin("1.1.0")),
        ("GC with only command", {"CNI_COMMAND": "GC"}, stdin("1.1.0")),
        ("null settings use defaults", env(), stdin(exclude_namespaces=None, prevResult=None)),
        ("unknown config keys", env(), stdin(ipam={}, dns={}, runtimeConfig={"portMappings": []})),
        ("every version", env(), stdin("0.1.0")),
        ("container id with dots", env(CNI_CONTAINERID="k8s_POD.web-1_default"), stdin()),
    ],
)
def test_parse_accepts(name: str, environ: dict[str, str], data: bytes) -> None:
    req = parse_request(environ, data)
    assert req.command == environ["CNI_COMMAND"]
    assert req.cni_version == json.loads(data)["cniVersion"]


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_every_supported_version_parses(version: str) -> None:
    assert parse_request(env(CNI_COMMAND="DEL"), stdin(version)).cni_version == version


def test_gc_valid_attachments() -> None:
    data = stdin(
        "1.1.0",
        **{"cni.dev/valid-attachments": [{"containerID": "a1", "ifname": "eth0"}, {"containerID": "b2"}]},
    )
    req = parse_request({"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}, data)
    assert req.valid_attachments == (("a1", "eth0"), ("b2", ""))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        (
            K8S_ARGS,
            {
                "IgnoreUnknown": "1",
                "K8S_POD_NAMESPACE": "default",
                "K8S_POD_NAME": "web-1",
                "K8S_POD_INFRA_CONTAINER_ID": "abc123",
                "K8S_POD_UID": "7f1c-uid",
            },
        ),
        ("A=1;A=2", {"A": "2"}),
        ("a=1;;b=2;", {"a": "1", "b": "2"}),
        ("k8s_pod_name=x", {"k8s_pod_name": "x"}),
    ],
)
def test_parse_cni_args(text: str, expected: dict[str, str]) -> None:
    assert parse_cni_args(text) == expected


def test_error_json() -> None:
    err = CniError(11, "no ztunnel connected", "pod default/httpbin-abc: will retry")
    assert json.loads(err.to_json("0.4.0")) == {
        "cniVersion": "0.4.0",
        "code": 11,
        "msg": "no ztunnel connected",
        "details": "pod default/httpbin-abc: will retry",
    }
    assert json.loads(CniError(4, "x").to_json("1.1.0")) == {"cniVersion": "1.1.0", "code": 4, "msg": "x"}


@pytest.mark.parametrize(
    ("data", "echoed"),
    [
        (b'{"cniVersion": "0.3.1"}', "0.3.1"),
        (b'{"cniVersion": "1.1.0"}', "1.1.0"),
        (b'{"cniVersion": "7.0.0"}', "1.1.0"),
        (b"", "1.1.0"),
        (b"garbage", "1.1.0"),
    ],
)
def test_version(data: bytes, echoed: str) -> None:
    assert json.loads(version_reply(data)) == {
        "cniVersion": echoed,
        "supportedVersions": list(SUPPORTED_VERSIONS),
    }
    req = parse_request({"CNI_COMMAND": "VERSION"}, data)
    assert req.command == "VERSION" and req.cni_version == echoed


# --- pod IPs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "version", "ips"),
    [
        (R020, "0.2.0", ("10.244.1.5", "fd00::5")),
        ({k: v for k, v in R020.items() if k != "cniVersion"}, "0.1.0", ("10.244.1.5", "fd00::5")),
        (R031, "0.3.1", ("10.244.1.5", "10.244.1.6", "fd00::5")),
        (R040, "0.4.0", ("10.244.1.5", "10.244.1.6", "fd00::5")),
        (R100, "1.0.0", ("10.244.1.5", "10.244.1.6", "fd00::5")),
        (R110, "1.1.0", ("10.244.1.5", "10.244.1.6", "fd00::5")),
        ({"ips": [{"address": "FD00:0:0::7/64"}, {"address": "fd00::7/128"}]}, "1.0.0", ("fd00::7",)),
        ({"ips": [{"address": "192.0.2.1"}]}, "1.0.0", ("192.0.2.1",)),
        ({"cniVersion": "1.0.0", "interfaces": []}, "1.0.0", ()),
    ],
)
def test_result_ips(result: dict[str, Any], version: str, ips: tuple[str, ...]) -> None:
    assert result_ips(result, version) == ips


def test_result_ips_prefers_result_version_over_config() -> None:
    # A 0.2.0-shaped prevResult that says so is read as 0.2.0 even under a 1.0.0 config.
    assert result_ips(R020, "1.0.0") == ("10.244.1.5", "fd00::5")


# --- conversions -----------------------------------------------------------------------------


def without_version(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "cniVersion"}


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [
        (R110, "1.0.0", R100),
        (R100, "1.1.0", R110),
        (R110, "0.4.0", R040),
        (R100, "0.3.1", R031),
        (R100, "0.3.0", {**R040, "cniVersion": "0.3.0"}),
        (R040, "0.3.1", R031),
        (R100, "0.2.0", R020),
        (R040, "0.2.0", R020),
        (R110, "0.1.0", {**R020, "cniVersion": "0.1.0"}),
        (
            R020,
            "0.4.0",
            {
                "cniVersion": "0.4.0",
                "ips": [
                    {"version": "4", "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
                    {"version": "6", "address": "fd00::5/64", "gateway": "fd00::1"},
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0"}],
                "dns": {"nameservers": ["10.96.0.10"]},
            },
        ),
        (
            R020,
            "1.1.0",
            {
                "cniVersion": "1.1.0",
                "ips": [
                    {"address": "10.244.1.5/24", "gateway": "10.244.1.1"},
                    {"address": "fd00::5/64", "gateway": "fd00::1"},
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0"}],
                "dns": {"nameservers": ["10.96.0.10"]},
            },
        ),
    ],
)
def test_convert(source: dict[str, Any], target: str, expected: dict[str, Any]) -> None:
    before = copy.deepcopy(source)
    out = json.loads(emit_result(source, target))
    assert out == expected
    assert next(iter(out)) == "cniVersion"
    assert source == before  # input untouched


def test_04_to_1x_drops_version_only() -> None:
    out = convert_result(R040, "0.4.0", "1.0.0")
    assert out["ips"] == [{k: v for k, v in ip.items() if k != "version"} for ip in R040["ips"]]
    assert out["interfaces"] == R040["interfaces"] and out["routes"] == R040["routes"]


def test_same_shape_keeps_unknown_keys() -> None:
    source = {**R100, "x-vendor": {"k": 1}}
    assert json.loads(emit_result(source, "1.1.0")) == {**source, "cniVersion": "1.1.0"}


def test_prev_result_without_version_is_in_request_version() -> None:
    assert json.loads(emit_result(without_version(R040), "0.4.0")) == R040
    assert json.loads(emit_result(without_version(R020), "0.2.0")) == R020


def test_legacy_keeps_first_address_per_family_and_routes_by_dst_family() -> None:
    source = {
        "cniVersion": "1.0.0",
        "ips": [{"address": "fd00::9/64"}, {"address": "10.0.0.9/8"}, {"address": "10.0.0.10/8"}],
        "routes": [{"dst": "10.1.0.0/16", "gw": "10.0.0.1"}, {"dst": "fd01::/16"}, {"dst": "0.0.0.0/0"}],
    }
    assert json.loads(emit_result(source, "0.2.0")) == {
        "cniVersion": "0.2.0",
        "ip4": {
            "ip": "10.0.0.9/8",
            "routes": [{"dst": "10.1.0.0/16", "gw": "10.0.0.1"}, {"dst": "0.0.0.0/0"}],
        },
        "ip6": {"ip": "fd00::9/64", "routes": [{"dst": "fd01::/16"}]},
    }
    v4_only = {
        "cniVersion": "0.4.0",
        "ips": [{"version": "4", "address": "10.0.0.9/8"}],
        "routes": [{"dst": "::/0"}],
    }
    assert json.loads(emit_result(v4_only, "0.1.0")) == {"cniVersion": "0.1.0", "ip4": {"ip": "10.0.0.9/8"}}


@pytest.mark.parametrize("target", ["0.1.0", "0.2.0"])
def test_legacy_needs_an_address(target: str) -> None:
    with pytest.raises(CniError) as info:
        emit_result({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []}, target)
    assert info.value.code == 1 and "no valid IP" in info.value.msg


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
@pytest.mark.parametrize("prev", [None, {}])
def test_empty_result(version: str, prev: dict[str, Any] | None) -> None:
    assert emit_result(prev, version) == json.dumps({"cniVersion": version})


@pytest.mark.parametrize("source", [R100, R110, R040, R031])
def test_round_trip_through_04_is_lossless_for_04_fields(source: dict[str, Any]) -> None:
    via = convert_result(convert_result(source, source["cniVersion"], "0.4.0"), "0.4.0", source["cniVersion"])
    expected = convert_result(convert_result(source, source["cniVersion"], "0.4.0"), "0.4.0", "0.4.0")
    assert convert_result(via, source["cniVersion"], "0.4.0") == expected


def test_convert_rejects_bad_input() -> None:
    with pytest.raises(CniError) as info:
        convert_result(R100, "1.0.0", "2.0.0")
    assert info.value.code == 1
    with pytest.raises(CniError) as info:
        emit_result({"cniVersion": "1.0.0", "ips": [{"address": "nope"}]}, "0.4.0")
    assert info.value.code == 6
