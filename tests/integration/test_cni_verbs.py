"""CHECK, GC, STATUS and hostile CNI_NETNS values, through the real shim and a real agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cni_agent.testing.localenv import EXPECTED_RULES, LocalEnv, wait_for
from cni_agent.testing.node import NodePod

pytestmark = pytest.mark.root


def shim(env: LocalEnv, command: str, conf: dict[str, Any], **cni_env: str) -> tuple[int, dict[str, Any]]:
    full = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_PATH": str(env.node.bin_dir), **cni_env}
    res = subprocess.run(
        [str(env.node.bin_dir / "ambient-cni")],
        input=json.dumps(conf).encode(),
        env=full,
        capture_output=True,
        check=False,
        timeout=30,
    )
    return res.returncode, (json.loads(res.stdout) if res.stdout.strip() else {})


def entry(env: LocalEnv, version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
    conf = dict(env.node.conflist["plugins"][-1])
    conf.update(cniVersion=version, name="acni-local", **extra)
    return conf


def pod_env(pod: NodePod) -> dict[str, str]:
    return {
        "CNI_CONTAINERID": pod.container_id,
        "CNI_NETNS": pod.netns_path,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": ";".join(f"{k}={v}" for k, v in pod.args.items()),
    }


def test_check_reports_missing_rules_and_then_passes_after_repair(env: LocalEnv) -> None:
    pod = env.node.add_pod("checked", "demo")
    conf = entry(env, prevResult=pod.result)
    assert shim(env, "CHECK", conf, **pod_env(pod)) == (0, {})
    # an operator (or another agent) flushes our nat chain: CHECK must notice
    env.break_rules(pod)
    code, err = shim(env, "CHECK", conf, **pod_env(pod))
    assert code == 1 and err["code"] == 11 and "rules" in err["msg"], err
    # CHECK of an excluded pod is fine; CHECK for a config version < 0.4.0 is refused (code 1)
    sys_pod = env.node.add_pod("dns", "kube-system")
    assert shim(env, "CHECK", entry(env, prevResult=sys_pod.result), **pod_env(sys_pod))[0] == 0
    code, err = shim(env, "CHECK", entry(env, "0.3.1", prevResult=pod.result), **pod_env(pod))
    assert code == 1 and err["code"] == 1


def test_gc_drops_attachments_the_runtime_no_longer_has(env: LocalEnv) -> None:
    keep = env.node.add_pod("keep", "demo")
    stale = env.node.add_pod("stale", "demo")
    valid = [{"containerID": keep.container_id, "ifname": "eth0"}]
    assert shim(env, "GC", entry(env, **{"cni.dev/valid-attachments": valid}))[0] == 0
    assert wait_for(lambda: stale.uid not in env.ztunnel.running)
    assert keep.uid in env.ztunnel.running
    registry = json.loads((env.agent.run_dir / "local-pods.json").read_text())
    assert {p["uid"] for p in registry["pods"]} == {keep.uid}


def test_status_boot_gate(env: LocalEnv, workdir: Path) -> None:
    assert shim(env, "STATUS", entry(env)) == (0, {})
    env.agent.stop()
    # ready once since boot (marker in the run dir): STATUS keeps succeeding while the agent restarts
    assert shim(env, "STATUS", entry(env)) == (0, {})
    # a fresh node (no marker) with no agent: code 50 holds new pods
    fresh = entry(env, agent_socket=str(workdir / "fresh" / "plugin.sock"))
    code, err = shim(env, "STATUS", fresh)
    assert code == 1 and err["code"] == 50, err
    code, err = shim(env, "STATUS", {**entry(env), "status_gate": "always"})
    assert code == 1 and err["code"] == 50
    assert shim(env, "STATUS", {**fresh, "status_gate": "never"})[0] == 0


@pytest.mark.parametrize("netns", ["/etc/passwd", "/var/run/netns/../../../etc/passwd", "/proc/self/ns/net"])
def test_netns_outside_allowed_roots_is_refused(env: LocalEnv, netns: str) -> None:
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=evil;K8S_POD_UID=evil-1"
    code, err = shim(
        env,
        "ADD",
        entry(env, "1.0.0"),
        CNI_CONTAINERID="evil1",
        CNI_NETNS=netns,
        CNI_IFNAME="eth0",
        CNI_ARGS=args,
    )
    assert code == 1 and err["code"] in (4, 7), err
    assert "evil-1" not in env.ztunnel.running
    assert env.agent.alive()


def test_netns_path_that_is_not_a_netns_is_refused(env: LocalEnv) -> None:
    fake = Path("/var/run/netns") / f"acni-notns-{os.getpid()}"
    fake.write_text("not a namespace")
    try:
        code, err = shim(
            env,
            "ADD",
            entry(env, "1.0.0"),
            CNI_CONTAINERID="notns1",
            CNI_NETNS=str(fake),
            CNI_IFNAME="eth0",
            CNI_ARGS="K8S_POD_NAMESPACE=demo;K8S_POD_NAME=notns;K8S_POD_UID=notns-1",
        )
    finally:
        fake.unlink()
    assert code == 1 and err["code"] == 7, err
    assert "netns" in err["msg"]
    assert "notns-1" not in env.ztunnel.running
    assert env.agent.alive()


def test_non_root_client_is_refused(env: LocalEnv, tmp_path_factory: pytest.TempPathFactory) -> None:
    pod_conf = json.dumps(entry(env, "1.0.0")).encode()
    # a copy that user nobody may execute (the pytest temp tree is root-only)
    public = Path("/tmp") / f"acni-shim-{os.getpid()}"
    public.write_bytes((env.node.bin_dir / "ambient-cni").read_bytes())
    public.chmod(0o755)
    res = subprocess.run(
        [str(public)],
        input=pod_conf,
        env={
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": "nobody1",
            "CNI_NETNS": "/var/run/netns/x",
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=nobody",
        },
        capture_output=True,
        check=False,
        timeout=30,
        user=65534,
        group=65534,
    )
    public.unlink()
    assert res.returncode == 1
    err = json.loads(res.stdout)
    assert err["code"] in (7, 11), err
    assert env.agent.alive()


def test_del_of_an_older_sandbox_keeps_the_current_one(env: LocalEnv) -> None:
    first = env.node.add_pod("web", "demo")
    env.node.remove_pod(first)
    second = env.node.add_pod("web", "demo", uid=first.uid)  # kubelet re-created the sandbox
    assert second.container_id != first.container_id
    assert wait_for(lambda: first.uid in env.ztunnel.running)
    # containerd repeats DEL for the old sandbox at removal, without a netns
    env.node.runner.delete(env.node.conflist, first.container_id, "", "eth0", first.args)
    assert first.uid in env.ztunnel.running, env.agent.log()[-3000:]
    assert shim(env, "CHECK", entry(env, prevResult=second.result), **pod_env(second)) == (0, {})


def test_host_netns_is_never_treated_as_a_pod(env: LocalEnv) -> None:
    """The agent runs in the node netns (its "host"): an alias of that netns must be refused."""
    alias = Path("/var/run/netns") / f"acni-hostalias-{os.getpid()}"
    alias.write_text("")
    subprocess.run(["mount", "--bind", env.node_netns_path, str(alias)], check=True)
    save = ["ip", "netns", "exec", env.node.node_netns, "sh", "-c", "iptables-legacy-save; nft list ruleset"]
    before = subprocess.run(save, capture_output=True, text=True, check=True).stdout
    try:
        code, err = shim(
            env,
            "ADD",
            entry(env, "1.0.0"),
            CNI_CONTAINERID="hostalias1",
            CNI_NETNS=str(alias),
            CNI_IFNAME="eth0",
            CNI_ARGS="K8S_POD_NAMESPACE=demo;K8S_POD_NAME=sneaky;K8S_POD_UID=sneaky-1",
        )
    finally:
        subprocess.run(["umount", str(alias)], check=False)
        alias.unlink()
    assert code == 1 and err["code"] == 7 and "host's network namespace" in err["msg"], err
    after = subprocess.run(save, capture_output=True, text=True, check=True).stdout
    strip = [ln for ln in before.splitlines() if not ln.startswith("#")]
    assert [ln for ln in after.splitlines() if not ln.startswith("#")] == strip


def test_del_that_fails_validation_still_removes_the_pod(env: LocalEnv) -> None:
    pod = env.node.add_pod("sloppy", "demo")
    broken_args = pod_env(pod) | {"CNI_ARGS": pod_env(pod)["CNI_ARGS"] + ";junk"}
    # an entry the agent does not accept (and a malformed CNI_ARGS pair): DEL still succeeds and removes
    assert shim(env, "DEL", entry(env, timeout_seconds="soon"), **broken_args)[0] == 0
    assert wait_for(lambda: pod.uid not in env.ztunnel.running), env.agent.log()[-3000:]


def test_uninstall_removes_host_probe_rules_but_not_pod_rules(env: LocalEnv) -> None:
    pod = env.node.add_pod("stays", "demo")
    node = env.node.node_netns

    def host_state() -> str:
        return subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                node,
                "sh",
                "-c",
                "iptables-legacy-save -t nat; nft list ruleset; ipset -n list",
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout

    assert "istio-inpod-probes-v4" in host_state()
    env.agent.stop()
    res = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            node,
            sys.executable,
            "-m",
            "cni_agent",
            "uninstall",
            "--run-dir",
            str(env.agent.run_dir),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    state = host_state()
    assert "istio-inpod-probes" not in state and "ISTIO_POSTRT" not in state, state
    assert len(env.istio_rules(pod)) == EXPECTED_RULES[env.backend]  # running pods keep their redirection
