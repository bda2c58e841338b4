"""Pod policy, netns path checks, the pod cache's fd ownership and the local registry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cni_agent.local.registry import LocalRegistry
from cni_agent.pods.cache import PodCache
from cni_agent.pods.model import Pod
from cni_agent.pods.policy import local_decision, netns_path_allowed


def pod(ns: str = "default", name: str = "web-1", uid: str = "u1", **kw: object) -> Pod:
    return Pod(uid=uid, name=name, namespace=ns, **kw)  # type: ignore[arg-type]


def test_local_decision() -> None:
    assert local_decision(pod(), exclude_namespaces={"kube-system"}).enroll
    assert not local_decision(pod("kube-system"), exclude_namespaces={"kube-system"}).enroll
    own = pod("istio-system", "ambient-cni-node-x7")
    assert not local_decision(
        own, exclude_namespaces=(), own_namespace="istio-system", own_name_prefix="ambient-cni-node-"
    ).enroll
    assert local_decision(
        pod("istio-system", "other"),
        exclude_namespaces=(),
        own_namespace="istio-system",
        own_name_prefix="ambient-cni-node-",
    ).enroll
    assert not local_decision(pod(host_network=True), exclude_namespaces=()).enroll


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/var/run/netns/cni-1234", True),
        ("/run/netns/netns-abc", True),
        ("/proc/42/ns/net", True),
        ("/proc/42/task/43/ns/net", True),
        ("/var/run/netns", False),
        ("/var/run/netns/a/b", False),
        ("/var/run/netns/../../etc/passwd", False),
        ("/etc/passwd", False),
        ("/proc/self/ns/net", False),
        ("/proc/42/ns/mnt", False),
        ("relative/netns", False),
    ],
)
def test_netns_path_allowed(path: str, ok: bool) -> None:
    assert netns_path_allowed(path) is ok


def test_netns_path_allowed_with_host_prefix() -> None:
    assert netns_path_allowed("/host/var/run/netns/x", roots=["/host/var/run/netns"], proc="/host/proc")
    assert netns_path_allowed("/host/proc/7/ns/net", roots=["/host/var/run/netns"], proc="/host/proc")
    assert not netns_path_allowed("/var/run/netns/x", roots=["/host/var/run/netns"], proc="/host/proc")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_cache_owns_fds(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    before = open_fds()
    cache = PodCache()
    first = cache.upsert(pod(), os.open(a, os.O_RDONLY))
    # same file again: the new fd is closed, the old one kept
    again = cache.upsert(pod(), os.open(a, os.O_RDONLY))
    assert again.netns_fd == first.netns_fd
    assert open_fds() == before + 1
    # a different file replaces and closes the old fd
    other = cache.upsert(pod(), os.open(b, os.O_RDONLY))
    assert other.netns_id != first.netns_id
    assert open_fds() == before + 1
    assert cache.find_container("") is None
    assert cache.forget("u1") and not cache.forget("u1")
    assert open_fds() == before
    for i in range(200):
        cache.upsert(pod(uid=f"p{i}"), os.open(a, os.O_RDONLY))
    assert len(cache) == 200
    cache.close()
    assert open_fds() == before


def test_registry_roundtrip_and_corruption(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "run" / "local-pods.json")
    assert reg.load() == []
    pods = [
        (pod(uid="b", ips=("10.0.0.2",), netns_path="/var/run/netns/b", container_id="c2"), (3, 4026532)),
        (pod(uid="a"), None),
    ]
    reg.save(pods)
    loaded = reg.load()
    assert [(p.uid, i) for p, i in loaded] == [("a", None), ("b", (3, 4026532))]
    assert loaded[1][0].ips == ("10.0.0.2",) and loaded[1][0].netns_path == "/var/run/netns/b"
    reg.path.write_text("{not json")
    assert reg.load() == []
    assert reg.path.with_suffix(".corrupt").exists()


def test_registry_saves_follow_every_change_while_reusing_records(tmp_path: Path) -> None:
    """Records are cached per pod object: a new object for the same uid (IP change, new netns)
    must still reach the file, a removed pod must leave it, and a fresh registry reads it all."""
    reg = LocalRegistry(tmp_path / "local-pods.json")
    a, b = pod(uid="a"), pod(uid="b", ips=("10.0.0.2",))
    reg.save([(a, (1, 10)), (b, None)])
    reg.save([(a, (1, 10)), (b, None)])
    b2 = pod(uid="b", ips=("10.0.0.9",))
    reg.save([(b2, (1, 11)), (a, (1, 12))])
    loaded = {p.uid: (p, i) for p, i in LocalRegistry(reg.path).load()}
    assert loaded["a"][1] == (1, 12) and loaded["b"][0].ips == ("10.0.0.9",) and loaded["b"][1] == (1, 11)
    reg.save([(b2, (1, 11))])
    assert [p.uid for p, _ in LocalRegistry(reg.path).load()] == ["b"]
    doc = json.loads(reg.path.read_text())
    assert doc["version"] == 1 and [p["uid"] for p in doc["pods"]] == ["b"]


def test_host_netns_path_forms(tmp_path: Path) -> None:
    from cni_agent.pods.netnspath import NetnsPathError, host_netns_path

    # the /proc form is never resolved (its target is not a path) and maps to the host's /proc
    assert host_netns_path("/proc/42/ns/net", host_proc="/host/proc") == "/host/proc/42/ns/net"
    assert host_netns_path("/proc/42/task/43/ns/net") == "/proc/42/task/43/ns/net"
    root = tmp_path / "host"
    (root / "run" / "netns").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")  # Debian: absolute link, must stay inside the prefix
    (root / "run" / "netns" / "cni-1").write_text("")
    (root / "run" / "netns" / "escape").symlink_to("/etc/passwd")
    (root / "run" / "netns" / "hop").symlink_to("../../var/run/netns/cni-1")
    prefix = str(root)
    assert host_netns_path("/var/run/netns/cni-1", prefix=prefix) == f"{prefix}/run/netns/cni-1"
    assert host_netns_path("/run/netns/hop", prefix=prefix) == f"{prefix}/run/netns/cni-1"
    for bad in (
        "/run/netns/escape",
        "/etc/passwd",
        "/var/run/netns/../../etc/passwd",
        "relative",
        "/proc/self/ns/net",
    ):
        with pytest.raises(NetnsPathError):
            host_netns_path(bad, prefix=prefix)


def test_resolve_in_root_link_loop(tmp_path: Path) -> None:
    from cni_agent.pods.netnspath import NetnsPathError, resolve_in_root

    (tmp_path / "a").symlink_to("/b")
    (tmp_path / "b").symlink_to("/a")
    with pytest.raises(NetnsPathError, match="too many symlinks"):
        resolve_in_root(str(tmp_path), "/a/x")
