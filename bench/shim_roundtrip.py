"""Shim exec + agent round trip for one CNI ADD, against exec baselines measured in the same run.

Processes are started with `posix_spawn` (stdin from a file, output to /dev/null) and reaped with
`waitpid`, the way a runtime execs a plugin, so the harness itself adds as little as possible; a
bare `/bin/true` measured the same way shows what is left of it. Other baselines: Debian's Go
`loopback` plugin answering VERSION (any Go plugin's exec floor) and `python3 -S -c pass` (what a
Python shim would cost before doing anything). The measured ADD is for a pod in an excluded
namespace, so it isolates exec + socket + agent dispatch from the netns and ztunnel work that
bench/rules_apply.py covers.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cni_agent.testing.agentproc import AgentProcess

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "build" / "bin" / "ambient-cni"
N = int(os.environ.get("BENCH_N", "200"))
TARGET_MS = 3.0


def median_ms(fn: Callable[[], None], n: int = N) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def spawn(argv: Sequence[str], env: Mapping[str, str], stdin: Path) -> None:
    """posix_spawn + waitpid; fails loudly if the child does not exit 0."""
    fd_in = os.open(stdin, os.O_RDONLY)
    fd_null = os.open("/dev/null", os.O_WRONLY)
    try:
        actions = [
            (os.POSIX_SPAWN_DUP2, fd_in, 0),
            (os.POSIX_SPAWN_DUP2, fd_null, 1),
            (os.POSIX_SPAWN_DUP2, fd_null, 2),
        ]
        pid = os.posix_spawn(argv[0], list(argv), dict(env), file_actions=actions)
    finally:
        os.close(fd_in)
        os.close(fd_null)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv[0]} exited with {os.waitstatus_to_exitcode(status)}")


def main() -> int:
    if not SHIM.exists():
        print(f"build the shim first: make plugin ({SHIM} missing)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="acni-bench-") as tmp:
        agent = AgentProcess(Path(tmp)).start()
        try:
            conf = Path(tmp) / "add.json"
            conf.write_text(
                json.dumps(
                    {
                        "cniVersion": "1.0.0",
                        "name": "bench",
                        "type": "ambient-cni",
                        "agent_socket": str(agent.plugin_socket),
                        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]},
                    }
                )
            )
            version = Path(tmp) / "version.json"
            version.write_text('{"cniVersion":"1.0.0"}')
            env = {
                "CNI_COMMAND": "ADD",
                "CNI_CONTAINERID": "bench0",
                "CNI_IFNAME": "eth0",
                "CNI_NETNS": "/var/run/netns/bench",
                "CNI_PATH": "/usr/lib/cni",
                "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=bench",
            }
            base_true = median_ms(lambda: spawn(["/bin/true"], {}, version))
            base_go = median_ms(lambda: spawn(["/usr/lib/cni/loopback"], {"CNI_COMMAND": "VERSION"}, version))
            base_py = median_ms(
                lambda: spawn([sys.executable, "-S", "-c", "pass"], {}, version), max(20, N // 4)
            )
            shim_local = median_ms(lambda: spawn([str(SHIM)], {"CNI_COMMAND": "VERSION"}, version))
            add = median_ms(lambda: spawn([str(SHIM)], env, conf))
        finally:
            agent.stop()
    size_kib = SHIM.stat().st_size / 1024
    print(f"shim size on disk:                                {size_kib:8.0f} KiB")
    print(f"baseline: /bin/true exec (harness floor):          {base_true:8.2f} ms median")
    print(f"baseline: Go plugin exec (loopback VERSION):       {base_go:8.2f} ms median")
    print(f"baseline: python3 -S -c pass exec:                 {base_py:8.2f} ms median")
    print(f"ambient-cni VERSION (answered by the shim alone): {shim_local:8.2f} ms median")
    print(f"ambient-cni ADD, exec + agent round trip:         {add:8.2f} ms median (n={N})")
    met = "MET" if add <= TARGET_MS else "NOT met"
    print(
        f"  target exec + round trip <= {TARGET_MS:.0f} ms: {met}; "
        f"round trip alone ~{add - shim_local:.2f} ms; a python exec is {base_py / add:.1f}x the whole ADD"
    )
    return 0
