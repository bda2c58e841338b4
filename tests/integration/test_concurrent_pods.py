"""Many sandboxes at once, as kubelet starts and stops them: the whole agent under concurrency.

16 pods are added through the real CNI chain from 8 threads at once, then deleted the same way.
Every ADD must return with the pod's own rules in place, ztunnel running it and its IP in the host
probe set under its UID; after the DELs nothing of them may be left anywhere (ztunnel, probe set,
registry). This exercises the per-pod locks, the single netns worker, registry writes and the kept
host-side netlink sockets together, which the per-component tests do not.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from cni_agent.redirect.hostprobe import parse_nft_set_elements
from cni_agent.testing.localenv import EXPECTED_RULES
from cni_agent.testing.localenv import LocalEnv as Env
from cni_agent.testing.localenv import wait_for as wait

pytestmark = pytest.mark.root

N_PODS = 16
PARALLEL = 8
PROBE_SET_V4 = "istio-inpod-probes-v4"


def probe_set(env: Env) -> dict[str, str]:
    """{ip: uid} of the node's IPv4 probe set, read with the stock tools (which must succeed: an
    empty answer from a failed command would make the final "nothing left" check pass vacuously)."""
    node = env.node.node_netns
    if env.backend == "nftables":
        argv = ["nft", "-j", "list", "set", "inet", "istio-ambient-nat", PROBE_SET_V4]
        out = env.node.exec(node, argv, check=True).stdout
        return parse_nft_set_elements(json.loads(out))
    out = env.node.exec(node, ["ipset", "list", PROBE_SET_V4], check=True).stdout
    members = out.split("Members:", 1)[1] if "Members:" in out else ""
    entries: dict[str, str] = {}
    for line in members.strip().splitlines():
        ip, _, rest = line.partition(" comment ")
        entries[ip.strip()] = rest.strip().strip('"')
    return entries


def registry_uids(env: Env) -> set[str]:
    return {p["uid"] for p in json.loads((env.agent.run_dir / "local-pods.json").read_text())["pods"]}


def test_concurrent_adds_and_dels(env: Env) -> None:
    with ThreadPoolExecutor(PARALLEL) as pool:
        pods = list(pool.map(lambda i: env.node.add_pod(f"burst-{i}", "demo"), range(N_PODS)))

    # every ADD returned only after its own pod was fully enrolled
    assert all(pod.ip for pod in pods), env.agent.log()
    assert len({pod.ip for pod in pods}) == N_PODS
    assert {pod.uid for pod in pods} <= env.ztunnel.running_uids(), env.agent.log()
    for pod in pods:
        assert len(env.istio_rules(pod)) == EXPECTED_RULES[env.backend], pod.name
    assert probe_set(env) == {pod.ip: pod.uid for pod in pods}
    assert registry_uids(env) == {pod.uid for pod in pods}

    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(env.node.remove_pod, pods))

    assert wait(lambda: not env.ztunnel.running_uids() & {pod.uid for pod in pods}), env.agent.log()
    assert probe_set(env) == {}
    assert registry_uids(env) == set()
    assert "Traceback" not in env.agent.log()
