"""The real Go shim exec'd against a real PluginServer (and against no server at all).

Proves the wire protocol end to end: what a runtime sees on stdout/exit for every verb, the fallbacks
when the agent is down, and that bad input never wedges the server. No root needed: the sockets live
in a temporary directory and the server accepts the test's own uid.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cni_agent.cni.request import SUPPORTED_VERSIONS, CniError, CniRequest
from cni_agent.cni.server import PluginServer

ROOT = Path(__file__).resolve().parents[2]
GO = shutil.which("go") or "/usr/local/go/bin/go"
T = TypeVar("T")

POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;K8S_POD_UID=uid-1"

PREV_RESULTS: dict[str, dict[str, Any]] = {
    "0.2.0": {"cniVersion": "0.2.0", "ip4": {"ip": "10.244.0.7/24", "gateway": "10.244.0.1"}},
    "0.3.1": {
        "cniVersion": "0.3.1",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p"}],
        "ips": [{"version": "4", "interface": 0, "address": "10.244.0.7/24"}],
    },
    "0.4.0": {
        "cniVersion": "0.4.0",
        "ips": [{"version": "6", "address": "fd00::7/64"}],
        "dns": {"nameservers": ["10.96.0.10"]},
    },
    "1.0.0": {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:00:07", "sandbox": "/var/run/netns/p"}],
        "ips": [{"interface": 0, "address": "10.244.0.7/24", "gateway": "10.244.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
    },
    "1.1.0": {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "mtu": 1450, "sandbox": "/var/run/netns/p"}],
        "ips": [{"interface": 0, "address": "10.244.0.7/24"}, {"interface": 0, "address": "fd00::7/64"}],
        "routes": [{"dst": "0.0.0.0/0", "priority": 10}],
    },
}


def _newest_source() -> float:
    return max(p.stat().st_mtime for p in (ROOT / "plugin").iterdir() if p.suffix in (".go", ".mod"))


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> str:
    """build/bin/ambient-cni when it is up to date, else a fresh build of plugin/ into a tmp dir."""
    built = ROOT / "build" / "bin" / "ambient-cni"
    if built.exists() and built.stat().st_mtime >= _newest_source():
        return str(built)
    out = tmp_path_factory.mktemp("bin") / "ambient-cni"
    subprocess.run(
        [GO, "build", "-trimpath", "-ldflags=-s -w", "-o", str(out), "."],
        cwd=ROOT / "plugin",
        env={**os.environ, "CGO_ENABLED": "0"},
        check=True,
        timeout=300,
    )
    return str(out)


@dataclass
class RecordingHandler:
    """Records every call; `errors[verb]` makes that verb raise."""

    calls: list[tuple[str, CniRequest | None]] = field(default_factory=list)
    errors: dict[str, BaseException] = field(default_factory=dict)
    gc_valid: list[list[tuple[str, str]]] = field(default_factory=list)

    def _record(self, verb: str, req: CniRequest | None) -> None:
        self.calls.append((verb, req))
        if verb in self.errors:
            raise self.errors[verb]

    async def cni_add(self, req: CniRequest) -> None:
        self._record("ADD", req)

    async def cni_del(self, req: CniRequest) -> None:
        self._record("DEL", req)

    async def cni_check(self, req: CniRequest) -> None:
        self._record("CHECK", req)

    async def cni_status(self) -> None:
        self._record("STATUS", None)

    async def cni_gc(self, req: CniRequest, valid: list[tuple[str, str]]) -> None:
        self.gc_valid.append(valid)
        self._record("GC", req)


class LoopThread:
    """An asyncio loop on a background thread, so the test thread can block on subprocesses."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Agent:
    server: PluginServer
    handler: RecordingHandler
    run_dir: Path

    @property
    def sock(self) -> str:
        return self.server.path


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture
def make_agent(loop_thread: LoopThread, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    servers: list[PluginServer] = []

    def make(name: str = "run", **kwargs: Any) -> Agent:
        kwargs.setdefault("allowed_uids", frozenset({os.getuid()}))
        handler = RecordingHandler()
        run_dir = tmp_path / name
        server = PluginServer(str(run_dir / "plugin.sock"), handler, **kwargs)
        loop_thread.run(server.start())
        servers.append(server)
        return Agent(server, handler, run_dir)

    yield make
    for server in reversed(servers):
        loop_thread.run(server.close())
        assert not os.path.exists(server.path)


@pytest.fixture
def agent(make_agent: Callable[..., Agent]) -> Agent:
    return make_agent()


def conf(sock: str, version: str = "1.0.0", **extra: Any) -> bytes:
    doc: dict[str, Any] = {
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "ambient-cni",
        "agent_socket": sock,
        "exclude_namespaces": ["kube-system"],
        "pod_namespace": "istio-system",
        "pod_name_prefix": "ambient-cni-node-",
        "log_level": "info",
    }
    doc.update(extra)
    return json.dumps(doc).encode()


def cni_env(command: str | None, args: str = POD_ARGS, **extra: str) -> dict[str, str]:
    env = {
        "CNI_CONTAINERID": "c0ffee01",
        "CNI_NETNS": "/var/run/netns/cni-test",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": args,
        **extra,
    }
    if command is not None:
        env["CNI_COMMAND"] = command
    return env


@dataclass
class Exec:
    exit: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        doc = json.loads(self.stdout)
        assert isinstance(doc, dict)
        return doc


def run_shim(binary: str, env: dict[str, str], stdin: bytes) -> Exec:
    proc = subprocess.run([binary], env=env, input=stdin, capture_output=True, timeout=30)
    return Exec(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


# --- agent up --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.2.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_prints_prev_result(shim: str, agent: Agent, version: str) -> None:
    prev = PREV_RESULTS[version]
    res = run_shim(shim, cni_env("ADD"), conf(agent.sock, version, prevResult=prev))
    assert res.exit == 0, res
    assert res.json() == prev
    [(verb, req)] = agent.handler.calls
    assert verb == "ADD" and req is not None
    assert (req.pod_namespace, req.pod_name, req.pod_uid, req.container_id) == (
        "default",
        "web-1",
        "uid-1",
        "c0ffee01",
    )
    expected_ips = {"0.4.0": ("fd00::7",), "1.1.0": ("10.244.0.7", "fd00::7")}.get(version, ("10.244.0.7",))
    assert req.ips == expected_ips
    assert agent.server.responses[("ADD", 0)] == 1


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_add_without_prev_result_prints_empty_result(shim: str, agent: Agent, version: str) -> None:
    res = run_shim(shim, cni_env("ADD"), conf(agent.sock, version))
    assert (res.exit, res.json()) == (0, {"cniVersion": version})


def test_add_converts_prev_result_to_config_version(shim: str, agent: Agent) -> None:
    res = run_shim(shim, cni_env("ADD"), conf(agent.sock, "0.4.0", prevResult=PREV_RESULTS["1.0.0"]))
    assert res.exit == 0
    assert res.json()["ips"] == [
        {"interface": 0, "address": "10.244.0.7/24", "gateway": "10.244.0.1", "version": "4"}
    ]


def test_add_handler_error_fails_with_its_code(shim: str, agent: Agent) -> None:
    agent.handler.errors["ADD"] = CniError(11, "no ztunnel connected", "pod default/web-1: will retry")
    res = run_shim(shim, cni_env("ADD"), conf(agent.sock, "0.4.0"))
    assert res.exit == 1
    assert res.json() == {
        "cniVersion": "0.4.0",
        "code": 11,
        "msg": "no ztunnel connected",
        "details": "pod default/web-1: will retry",
    }
    assert "no ztunnel connected" in res.stderr
    assert agent.server.responses[("ADD", 11)] == 1


def test_add_unexpected_exception_is_retryable(shim: str, agent: Agent) -> None:
    agent.handler.errors["ADD"] = RuntimeError("kaboom")
    res = run_shim(shim, cni_env("ADD"), conf(agent.sock))
    assert res.exit == 1
    assert res.json()["code"] == 11 and "kaboom" in res.json()["msg"]
    # and the server keeps serving
    agent.handler.errors.clear()
    assert run_shim(shim, cni_env("ADD"), conf(agent.sock)).exit == 0


def test_add_that_cannot_be_printed_does_not_enrol(shim: str, agent: Agent) -> None:
    prev = {"cniVersion": "1.0.0", "ips": []}
    res = run_shim(shim, cni_env("ADD"), conf(agent.sock, "0.2.0", prevResult=prev))
    assert res.exit == 1 and res.json()["code"] == 1
    assert agent.handler.calls == []


@pytest.mark.parametrize(
    "env",
    [
        cni_env("DEL"),
        cni_env("DEL", CNI_NETNS=""),
        {"CNI_COMMAND": "DEL", "CNI_IFNAME": "eth0"},  # no container id: invalid, still succeeds
    ],
)
def test_del_always_succeeds(shim: str, agent: Agent, env: dict[str, str]) -> None:
    agent.handler.errors["DEL"] = CniError(7, "netns gone")
    res = run_shim(shim, env, conf(agent.sock, "0.4.0", prevResult=PREV_RESULTS["0.4.0"]))
    assert (res.exit, res.stdout) == (0, "")
    assert agent.server.responses[("DEL", 0)] == 1


def test_del_with_stale_config_succeeds(shim: str, agent: Agent) -> None:
    res = run_shim(shim, cni_env("DEL"), conf(agent.sock, "9.9.9"))
    assert (res.exit, res.stdout) == (0, "")
    assert "ignored" in res.stderr


def test_check_status_gc_version(shim: str, agent: Agent) -> None:
    assert run_shim(shim, cni_env("CHECK"), conf(agent.sock, "1.0.0")).stdout == ""
    res = run_shim(shim, {"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}, conf(agent.sock, "1.1.0"))
    assert (res.exit, res.stdout) == (0, "")
    attachments = {"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]}
    res = run_shim(shim, {"CNI_COMMAND": "GC"}, conf(agent.sock, "1.1.0", **attachments))
    assert (res.exit, res.stdout) == (0, "")
    assert agent.handler.gc_valid == [[("c1", "eth0")]]
    assert [verb for verb, _ in agent.handler.calls] == ["CHECK", "STATUS", "GC"]
    res = run_shim(shim, {"CNI_COMMAND": "VERSION"}, conf(agent.sock, "0.3.1"))
    assert res.json() == {"cniVersion": "0.3.1", "supportedVersions": list(SUPPORTED_VERSIONS)}
    assert agent.server.responses[("VERSION", 0)] == 1  # answered by the agent, not the fallback


def test_status_not_ready(shim: str, agent: Agent) -> None:
    agent.handler.errors["STATUS"] = CniError(50, "waiting for ztunnel")
    res = run_shim(shim, {"CNI_COMMAND": "STATUS"}, conf(agent.sock, "1.1.0"))
    assert res.exit == 1 and res.json()["code"] == 50


@pytest.mark.parametrize(
    ("name", "env", "stdin", "code"),
    [
        ("empty stdin", cni_env("ADD"), b"", 6),
        ("invalid JSON", cni_env("ADD"), b"{nope", 6),
        ("missing cniVersion", cni_env("ADD"), None, 7),
        ("unsupported version", cni_env("ADD"), "0.9.0", 1),
        ("missing CNI_COMMAND", cni_env(None), "1.0.0", 4),
        ("missing CNI_NETNS", cni_env("ADD", CNI_NETNS=""), "1.0.0", 4),
        ("malformed CNI_ARGS", cni_env("ADD", args="K8S_POD_NAME"), "1.0.0", 4),
        ("10 MB stdin", cni_env("ADD"), b"{" + b" " * 10_000_000 + b"}", 7),
    ],
)
def test_bad_input(shim: str, agent: Agent, name: str, env: dict[str, str], stdin: Any, code: int) -> None:
    if stdin is None:
        doc = json.loads(conf(agent.sock))
        del doc["cniVersion"]
        stdin = json.dumps(doc).encode()
    elif isinstance(stdin, str):
        stdin = conf(agent.sock, stdin)
    res = run_shim(shim, env, stdin)
    assert res.exit == 1, res
    assert res.json()["code"] == code, res
    assert agent.handler.calls == []
    # the server still answers afterwards
    ok = run_shim(shim, cni_env("ADD"), conf(agent.sock))
    assert (ok.exit, ok.json()) == (0, {"cniVersion": "1.0.0"})


# --- agent down ------------------------------------------------------------------------------


@pytest.fixture
def down(tmp_path: Path) -> str:
    """A socket path in an existing run dir where no agent listens."""
    (tmp_path / "down").mkdir()
    return str(tmp_path / "down" / "plugin.sock")


def test_down_add_fails_closed_naming_the_socket(shim: str, down: str) -> None:
    res = run_shim(shim, cni_env("ADD"), conf(down, prevResult=PREV_RESULTS["1.0.0"]))
    assert res.exit == 1
    err = res.json()
    assert err["code"] == 11 and down in err["msg"] and "unreachable" in err["msg"]
    assert "DaemonSet" in err["details"] and "default/web-1" in err["details"]


@pytest.mark.parametrize(
    "args",
    [
        "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=ambient-cni-node-abcde",
    ],
)
def test_down_add_passes_excluded_and_own_pods(shim: str, down: str, args: str) -> None:
    prev = PREV_RESULTS["1.0.0"]
    res = run_shim(shim, cni_env("ADD", args=args), conf(down, "1.1.0", prevResult=prev))
    assert res.exit == 0, res
    assert res.json() == {**prev, "cniVersion": "1.1.0"}


def test_down_other_verbs(shim: str, down: str) -> None:
    res = run_shim(shim, cni_env("DEL"), conf(down))
    assert (res.exit, res.stdout) == (0, "")
    res = run_shim(shim, {"CNI_COMMAND": "GC"}, conf(down, "1.1.0"))
    assert (res.exit, res.stdout) == (0, "")
    res = run_shim(shim, {"CNI_COMMAND": "VERSION"}, conf(down, "0.4.0"))
    assert (res.exit, res.json()) == (
        0,
        {"cniVersion": "0.4.0", "supportedVersions": list(SUPPORTED_VERSIONS)},
    )
    res = run_shim(shim, cni_env("CHECK"), conf(down))
    assert res.exit == 1 and res.json()["code"] == 11
    res = run_shim(shim, cni_env(None), conf(down))
    assert res.exit == 1 and res.json()["code"] == 4


def test_down_status_boot_gate(shim: str, down: str) -> None:
    status = {"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}
    res = run_shim(shim, status, conf(down, "1.1.0"))
    assert res.exit == 1 and res.json() == {
        "cniVersion": "1.1.0",
        "code": 50,
        "msg": res.json()["msg"],
        "details": res.json()["details"],
    }
    Path(down).with_name("ready").touch()
    res = run_shim(shim, status, conf(down, "1.1.0"))
    assert (res.exit, res.stdout) == (0, "")
    res = run_shim(shim, status, conf(down, "1.1.0", status_gate="always"))
    assert res.exit == 1 and res.json()["code"] == 50


def test_stopped_agent_leaves_marker_and_no_socket(
    shim: str, make_agent: Callable[..., Agent], loop_thread: LoopThread
) -> None:
    agent = make_agent("stopping")
    agent.server.mark_ready()
    loop_thread.run(agent.server.close())
    res = run_shim(shim, {"CNI_COMMAND": "STATUS"}, conf(agent.sock, "1.1.0"))
    assert (res.exit, res.stdout) == (0, "")
    res = run_shim(shim, cni_env("ADD"), conf(agent.sock))
    assert res.exit == 1 and res.json()["code"] == 11


# --- raw socket: the server's own defences ---------------------------------------------------


def raw_exchange(path: str, payload: bytes, *, half_close: bool = True) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    reply = json.loads(b"".join(chunks))
    assert isinstance(reply, dict)
    return reply


def envelope(env: dict[str, str], stdin: bytes, v: int = 1) -> bytes:
    return json.dumps({"v": v, "env": env, "stdin_b64": base64.b64encode(stdin).decode()}).encode()


def test_socket_permissions(agent: Agent) -> None:
    assert os.stat(agent.sock).st_mode & 0o777 == 0o600
    assert os.stat(agent.run_dir).st_mode & 0o777 == 0o700


def test_peer_uid_not_allowed(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent("strict", allowed_uids=frozenset({65534}))
    reply = raw_exchange(agent.sock, envelope(cni_env("ADD"), conf(agent.sock)))
    assert reply["exit_code"] == 1
    err = json.loads(reply["stdout"])
    assert err["code"] == 7 and err["msg"] == f"permission denied: uid {os.getuid()}"
    assert agent.handler.calls == []


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", 6),
        (b"not json", 6),
        (b"[]", 6),
        (envelope(cni_env("ADD"), b"{}", v=2), 6),
        (b'{"v": 1, "env": {"CNI_COMMAND": 1}, "stdin_b64": ""}', 6),
        (b'{"v": 1, "env": {"CNI_COMMAND": "ADD"}, "stdin_b64": "***"}', 6),
    ],
)
def test_malformed_envelopes(agent: Agent, payload: bytes, code: int) -> None:
    reply = raw_exchange(agent.sock, payload)
    assert reply["exit_code"] == 1 and json.loads(reply["stdout"])["code"] == code
    assert raw_exchange(agent.sock, envelope(cni_env("ADD"), conf(agent.sock)))["exit_code"] == 0


def test_oversized_request(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent("small", max_request=4096)
    reply = raw_exchange(agent.sock, envelope(cni_env("ADD"), b" " * 8192))
    assert reply["exit_code"] == 1 and json.loads(reply["stdout"])["code"] == 7
    assert raw_exchange(agent.sock, envelope(cni_env("ADD"), conf(agent.sock)))["exit_code"] == 0


def test_slow_and_vanishing_clients_do_not_block_others(shim: str, make_agent: Callable[..., Agent]) -> None:
    agent = make_agent("slow", read_timeout=0.5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
        stalled.connect(agent.sock)
        stalled.sendall(b'{"v": 1')  # never finishes
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
            gone.connect(agent.sock)
        res = run_shim(shim, cni_env("ADD"), conf(agent.sock))
        assert (res.exit, res.json()) == (0, {"cniVersion": "1.0.0"})
        stalled.settimeout(5)
        reply = json.loads(stalled.recv(65536))
        assert reply["exit_code"] == 1 and json.loads(reply["stdout"])["code"] == 5


def test_stale_socket_is_replaced(make_agent: Callable[..., Agent], tmp_path: Path) -> None:
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(run_dir / "plugin.sock"))
    leftover.close()  # the file stays behind, nobody listens
    agent = make_agent("stale")
    assert raw_exchange(agent.sock, envelope({"CNI_COMMAND": "VERSION"}, b""))["exit_code"] == 0


def test_live_socket_is_taken_over_and_not_removed_by_the_old_agent(
    make_agent: Callable[..., Agent], loop_thread: LoopThread
) -> None:
    old = make_agent("surge")
    new = make_agent("surge")
    loop_thread.run(old.server.close())
    assert raw_exchange(new.sock, envelope(cni_env("ADD"), conf(new.sock)))["exit_code"] == 0
    assert [verb for verb, _ in new.handler.calls] == ["ADD"] and old.handler.calls == []


def test_refuses_to_replace_a_non_socket(loop_thread: LoopThread, tmp_path: Path) -> None:
    path = tmp_path / "plugin.sock"
    path.write_text("not a socket")
    server = PluginServer(str(path), RecordingHandler())
    with pytest.raises(FileExistsError):
        loop_thread.run(server.start())
    assert path.read_text() == "not a socket"
