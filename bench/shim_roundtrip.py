"""Shim exec + agent round trip for one CNI ADD, against exec baselines measured in the same run.

Baselines: exec of Debian's Go `loopback` plugin answering VERSION (the floor for any Go plugin
exec) and `python3 -c pass` (what a Python shim would cost before doing anything). The measured
ADD is for a pod in an excluded namespace, so it isolates exec + socket + agent dispatch from the
netns and ztunnel work that other benchmarks cover.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cni_agent.testing.agentproc import AgentProcess

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "build" / "bin" / "ambient-cni"
N = int(os.environ.get("BENCH_N", "200"))


def median_ms(fn: Callable[[], None], n: int = N) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main() -> int:
    if not SHIM.exists():
        print(f"build the shim first: make plugin ({SHIM} missing)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="acni-bench-") as tmp:
        agent = AgentProcess(Path(tmp)).start()
        try:
            conf = json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "bench",
                    "type": "ambient-cni",
                    "agent_socket": str(agent.plugin_socket),
                    "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]},
                }
            ).encode()
            env = {
                "CNI_COMMAND": "ADD",
                "CNI_CONTAINERID": "bench0",
                "CNI_IFNAME": "eth0",
                "CNI_NETNS": "/var/run/netns/bench",
                "CNI_PATH": "/usr/lib/cni",
                "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=bench",
            }

            def shim_add() -> None:
                subprocess.run([str(SHIM)], input=conf, env=env, capture_output=True, check=True)

            def true_exec() -> None:
                subprocess.run(["/bin/true"], capture_output=True, check=True)

            def go_exec() -> None:
                subprocess.run(
                    ["/usr/lib/cni/loopback"],
                    input=b'{"cniVersion":"1.0.0"}',
                    env={"CNI_COMMAND": "VERSION"},
                    capture_output=True,
                    check=True,
                )

            def py_exec() -> None:
                subprocess.run([sys.executable, "-S", "-c", "pass"], capture_output=True, check=True)

            base_true = median_ms(true_exec)
            base_go = median_ms(go_exec)
            base_py = median_ms(py_exec, max(20, N // 4))
            add = median_ms(shim_add)
        finally:
            agent.stop()
    size_kib = SHIM.stat().st_size / 1024
    print(f"shim size on disk:                         {size_kib:8.0f} KiB")
    print(f"baseline: /bin/true exec (harness cost):    {base_true:8.2f} ms median")
    print(f"baseline: Go plugin exec (loopback VERSION): {base_go:8.2f} ms median")
    print(f"baseline: python3 -S -c pass exec:          {base_py:8.2f} ms median")
    print(f"ambient-cni ADD, exec + agent round trip:  {add:8.2f} ms median (n={N})")
    print(
        f"  shim + agent beyond a bare exec of /bin/true: {add - base_true:.2f} ms; "
        f"target exec + round trip <= 3 ms: {'MET' if add <= 3.0 else 'NOT met'}; "
        f"a bare python exec is {base_py / add:.1f}x the whole ADD"
    )
    return 0
