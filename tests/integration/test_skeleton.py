"""The walking skeleton, end to end and for real.

Runtime-style CNI chain (loopback, bridge + host-local, ambient-cni shim) → the agent in local mode →
python-iptables rules + ip rule/route in the pod netns → ZDS Add with the netns fd → the ztunnel-like
peer acks and listens in the pod → real TCP connections land on its ports with the original
destination. Plus DEL, restart with snapshot replay, agent-down fallbacks and bad input.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from cni_agent.testing.cniexec import CniExecError, CniRunner
from cni_agent.testing.localenv import EXPECTED_RULES
from cni_agent.testing.localenv import LocalEnv as Env
from cni_agent.testing.localenv import wait_for as wait

pytestmark = pytest.mark.root


def test_add_installs_rules_and_acks_before_returning(env: Env) -> None:
    pod = env.node.add_pod("web", "demo")
    # ADD has returned: the ack must already have happened (first packet is captured).
    assert pod.uid in env.ztunnel.running, env.agent.log()
    assert pod.ip and pod.result["ips"][0]["address"].startswith(pod.ip)
    rules = env.istio_rules(pod)
    assert len(rules) == EXPECTED_RULES[env.backend], rules
    ip_rule = env.node.exec(pod.netns_name, ["ip", "rule", "show"]).stdout
    assert "fwmark 0x111/0xfff lookup 100" in ip_rule
    assert (
        "fwmark 0x111/0xfff lookup 100" in env.node.exec(pod.netns_name, ["ip", "-6", "rule", "show"]).stdout
    )
    route = env.node.exec(pod.netns_name, ["ip", "route", "show", "table", "100"]).stdout
    assert "local default dev lo" in route
    info = env.ztunnel.running[pod.uid].info
    assert (info.name, info.namespace) == ("web", "demo")


def test_traffic_lands_on_ztunnel_ports_with_original_destination(env: Env) -> None:
    client = env.node.add_pod("client", "demo")
    server = env.node.add_pod("server", "demo")
    outsider = env.node.add_pod("outsider", "kube-system")  # not enrolled: its traffic is not captured
    env.connect(client.netns_path, (server.ip, 8080))
    out = env.ztunnel.running[client.uid].listeners.wait_for(lambda s: s.port == 15001, 5)
    assert out.original_dst == (server.ip, 8080)
    assert out.peer[0] == client.ip
    env.connect(outsider.netns_path, (server.ip, 80))
    inb = env.ztunnel.running[server.uid].listeners.wait_for(lambda s: s.port == 15006, 5)
    assert inb.original_dst == (server.ip, 80)
    assert inb.peer[0] == outsider.ip


def test_node_probe_is_snated_and_not_captured(env: Env) -> None:
    """A kubelet-style connection from the node reaches the app itself, from 169.254.7.127."""
    server = env.node.add_pod("server", "demo")
    with env.listen(server.netns_path, 8081) as app:
        env.connect(env.node_netns_path, (server.ip, 8081))
        conn, peer = app.accept()
        conn.close()
    assert peer[0] == "169.254.7.127"
    assert not any(s.original_dst[1] == 8081 for s in env.ztunnel.running[server.uid].listeners.intercepted)


def test_excluded_namespace_passes_through_unenrolled(env: Env) -> None:
    pod = env.node.add_pod("coredns", "kube-system")
    assert pod.ip, "prevResult must be passed through"
    assert pod.uid not in env.ztunnel.running
    assert env.istio_rules(pod) == []


def test_del_removes_from_ztunnel_and_forgets(env: Env) -> None:
    pod = env.node.add_pod("gone", "demo")
    assert pod.uid in env.ztunnel.running
    env.node.remove_pod(pod)
    assert wait(lambda: pod.uid not in env.ztunnel.running), "ztunnel still runs the pod"
    registry = json.loads((env.agent.run_dir / "local-pods.json").read_text())
    assert all(p["uid"] != pod.uid for p in registry["pods"])
    # DEL again (containerd repeats it on removal, without a netns): still fine
    env.node.runner.delete(env.node.conflist, pod.container_id, "", "eth0", pod.args)


def test_restart_replays_snapshot_and_keeps_pods(env: Env) -> None:
    a = env.node.add_pod("a", "demo")
    b = env.node.add_pod("b", "demo")
    snapshots_before = env.ztunnel.snapshots
    env.agent.stop()
    env.agent.start()
    # the peer reconnects on EOF and must receive a snapshot naming both pods: nothing drained
    assert wait(lambda: env.ztunnel.snapshots > snapshots_before, 10), env.agent.log()
    running = sorted(env.ztunnel.running)
    assert set(running) == {a.uid, b.uid}, (running, a.uid, b.uid, env.agent.log()[-4000:])
    # and the restarted agent keeps serving
    c = env.node.add_pod("c", "demo")
    assert set(env.ztunnel.running) == {a.uid, b.uid, c.uid}


def test_no_ztunnel_fails_add_with_retryable_error(env: Env) -> None:
    env.ztunnel.stop()
    assert wait(lambda: True)
    with pytest.raises(CniExecError) as err:
        env.node.add_pod("lonely", "demo")
    assert err.value.plugin == "ambient-cni"
    assert err.value.code == 11
    assert "ztunnel" in err.value.msg


def test_agent_down_fallbacks(env: Env) -> None:
    env.agent.stop()
    with pytest.raises(CniExecError) as err:
        env.node.add_pod("stalled", "demo")
    assert err.value.code == 11
    assert str(env.agent.plugin_socket) in err.value.msg
    # DEL succeeds without the agent (the pod above was recorded by the node helper)
    stalled = env.node.pods[-1]
    env.node.remove_pod(stalled)
    # VERSION answers without the agent
    runner = CniRunner([str(env.node.bin_dir)])
    res = runner.exec("ambient-cni", "VERSION", b'{"cniVersion":"1.0.0"}', {})
    assert res.returncode == 0
    assert "1.1.0" in res.json()["supportedVersions"]


def _shim(env: Env, command: str | None, stdin: bytes, **extra: str) -> subprocess.CompletedProcess[bytes]:
    e = {
        "PATH": os.environ["PATH"],
        "CNI_CONTAINERID": "c0ffee",
        "CNI_IFNAME": "eth0",
        "CNI_NETNS": "/var/run/netns/does-not-exist",
        "CNI_PATH": "/usr/lib/cni",
        **extra,
    }
    if command is not None:
        e["CNI_COMMAND"] = command
    return subprocess.run(
        [str(env.node.bin_dir / "ambient-cni")],
        input=stdin,
        env=e,
        capture_output=True,
        check=False,
        timeout=30,
    )


def conf(env: Env) -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": "acni-local",
        "type": "ambient-cni",
        "agent_socket": str(env.agent.plugin_socket),
    }


@pytest.mark.parametrize(
    ("command", "stdin", "extra", "codes"),
    [
        ("ADD", b"{this is not json", {}, {4, 6, 7}),
        (None, None, {}, {4}),
        ("ADD", None, {"CNI_ARGS": "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=x"}, {4, 7}),
    ],
    ids=["malformed-stdin", "missing-CNI_COMMAND", "netns-missing"],
)
def test_bad_input_gets_error_json_and_agent_survives(
    env: Env, command: str | None, stdin: bytes | None, extra: dict[str, str], codes: set[int]
) -> None:
    body = stdin if stdin is not None else json.dumps(conf(env)).encode()
    res = _shim(env, command, body, **extra)
    assert res.returncode == 1, res
    err = json.loads(res.stdout)
    assert err["code"] in codes, err
    assert err["msg"]
    assert env.agent.alive()
    pod = env.node.add_pod("after-bad-input", "demo")
    assert pod.uid in env.ztunnel.running
